"""The Open Inference Protocol over gRPC: the servicer, the key interceptor (the key checked from the
metadata before a message is parsed), status codes and the server. May import `v2`, `serving` and
everything below; never `http` or `app`."""
