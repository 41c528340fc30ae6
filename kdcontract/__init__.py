"""kdcontract: what training and serving must agree on, defined once and free of torch.

The manifest schema (`manifest`), image preparation (`imageprep`), the pictures clients send
(`client_forms`), served model names, roles and aliases (`names`), the fusion rule (`fusion`), the
ONNX Runtime session settings (`ort_session`), the bundled digits and their split (`digits`),
percentiles (`stats`), anytime-valid confidence sequences (`sequential`: the online gates and the offline
gate share them), report tables (`tables`) and the accuracy-cost report (`pareto`). `training`,
`gateway` and `loadtest` import it; it imports none of them (import-linter contracts in `make test`).
"""
