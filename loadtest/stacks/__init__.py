"""Whole stacks brought up and driven: the demo, a rollout, the loop, monitoring with Prometheus, the
dashboard check. May import `loadtest.benchmarks` and `loadtest.clients`."""
