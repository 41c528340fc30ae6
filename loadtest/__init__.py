"""kdserve load testing and benchmarks (`python -m loadtest ...`)."""
