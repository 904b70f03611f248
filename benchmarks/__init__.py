"""fedatt benchmarks (issue 5): on-device training, aggregation, transport, simulator scale, Flower side by side.

Each `benchmarks/bench_*.py` runs alone (`python -m benchmarks.bench_x [--quick]`) and writes its figures to
`benchmarks/results/<name>.json`; `python -m benchmarks.run_all` (= `make bench`) runs them all. Results and the
commands that produced them are discussed in docs/PERFORMANCE.md.
"""
