"""The benchmark suite: what a preemption costs, measured against the limits (``python -m benchmarks``)."""
