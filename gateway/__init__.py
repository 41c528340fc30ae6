"""kdserve gateway: the FastAPI front end over Triton, and the supervisor of the embedded Triton.

It reads the model repository through `kdcontract` and never imports `training` or torch. Its packages
are layered, each importing only those below it (import-linter in `make test`; docs/architecture.md):
`app` (composition) over the protocols `http` and `grpc`, over `v2` (the Open Inference Protocol's model),
over `serving` (the classify path), over `experiments`, `feedback` and `capture`, over `settings`, `auth`,
`triton` and `telemetry`; `errors`, `files`, `single_flight` and `readiness` are plain helpers. `cli`,
`process` (the process API the load tools use), `erase` and `experiment_cost` are entry points."""
