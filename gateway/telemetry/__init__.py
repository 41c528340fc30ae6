"""What the gateway tells operators: Prometheus series (`metrics`), OpenTelemetry spans (`tracing`) and
their OTLP/JSON encoding (`otlp_json`). May import the plain helpers only."""
