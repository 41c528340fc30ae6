"""One measurement each, written to `benchmarks/`: `bench` (in-process vs Triton vs gateway), protocols,
cascade, capture cost, faults and noisy neighbours, soak, the statistics study, the README's headline.
May import `loadtest.clients`."""
