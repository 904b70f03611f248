"""fedatt simulator: a fleet of virtual devices (real EdgeClients) with their own data partitions, on one machine.

Offline datasets live in `simulator.datasets` and partitioners in `simulator.partition` (numpy only, torch-free).
"""
