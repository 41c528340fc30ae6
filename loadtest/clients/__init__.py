"""What makes load and measures it: Locust's users, stages and runs (`locustfile`, `stages`, `run`,
`report`), perf_analyzer, interleaved timing and metric reading (`measure`), served accuracy. Imports no
other part of `loadtest`."""
