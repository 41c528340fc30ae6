"""Who may call what: the key model (`keys`), the key gate (`gate`: credential, scope, rate, requests in
flight; the keys file followed), and the scopes endpoints declare (`scopes`). Protocol-free: HTTP's
middleware and gRPC's interceptor apply it. May import `telemetry` and the plain helpers."""
