"""Feedback: what each request was answered, kept by request id (`answers`), and ground truth joined
to it (`join`), counted per arm for the top-1 gate. May import `telemetry` and the plain helpers."""
