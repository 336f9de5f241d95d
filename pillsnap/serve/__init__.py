"""The HTTP API (FastAPI on uvicorn) over pillsnap.infer: health, ready, predict, batch, metrics."""
