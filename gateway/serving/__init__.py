"""The classify path, with no protocol and no web framework: `inference.classify_request` does one
classification for any protocol (A/B arm, decoding, admission, Triton, fusion, answers kept, capture),
`service.Classifier` resolves a name to Triton models and fuses; `routing` (A/B arms), `admission`,
`images`, `experiment` (the experiment a replica runs), `manifest_follow`, `health`. May import the
stores (`experiments`, `feedback`, `capture`), `settings`, `auth`, `triton`, `telemetry` and the helpers."""
