"""kdserve gateway: runs the embedded Triton server and (next) the FastAPI front end. Never imports torch."""
