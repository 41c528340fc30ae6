"""kdserve load testing and benchmarks (`python -m loadtest ...`), layered like the gateway: `cli` over
`stacks` (whole stacks brought up and driven: demo, rollout, loop, monitoring, dashboard) over
`benchmarks` (one measurement each) over `clients` (what makes load and measures it). The gateway is
reached only through its process API and the wire."""
