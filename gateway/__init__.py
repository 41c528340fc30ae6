"""kdserve gateway: the FastAPI front end over Triton, and the supervisor of the embedded Triton.

It reads the model repository through `kdcontract` and never imports `training` or torch (import-linter
contracts in `make test`)."""
