"""The aggregator side of fedatt: aggregation strategies, update validation, rounds, checkpoints, MQTT service."""
