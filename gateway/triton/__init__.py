"""Triton: the embedded server's process (`server`), its REST wire format (`rest`), the pooled async
client with deadlines and retries (`client`) and call coalescing (`coalesce`). May import `telemetry`
and the plain helpers."""
