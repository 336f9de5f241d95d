# The PillSnap HTTP API for one trained experiment: `pillsnap serve` on uvicorn, port 8000.
#
#   docker build -f deployments/api.Dockerfile -t pillsnap-api .
#   docker run --rm -p 127.0.0.1:8000:8000 -v /data/exp/exp01:/exp:ro \
#       -e PILLSNAP_API_KEYS="$(cat api-keys.txt | paste -sd,)" pillsnap-api --stage 4 --engine onnx
#
# The experiment folder (checkpoints, exports, class map) is mounted read-only at /exp; keys come from the
# environment, never from the image. For a GPU, start from an nvidia/cuda runtime image with the same Python,
# run with `--gpus all`, and set inference.device=cuda (onnxruntime-gpu for the ONNX engine).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 pillsnap
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pillsnap ./pillsnap
COPY tasks ./tasks
COPY flows ./flows
COPY configs ./configs
# editable: the package finds configs/ beside it, as in a checkout
RUN pip install --no-cache-dir -e . && mkdir -p /tmp/ultralytics && chown pillsnap /tmp/ultralytics

USER pillsnap
ENV YOLO_CONFIG_DIR=/tmp/ultralytics YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# --host 0.0.0.0 inside the container only; publish the port on 127.0.0.1 or behind a TLS proxy.
# The experiment's own resolved config (backbone, sizes, thresholds), pointed at the mounted folder.
ENTRYPOINT ["pillsnap", "serve", "--config", "/exp/config.resolved.yaml", "--host", "0.0.0.0", "--port", "8000", "paths.exp_dir=/exp"]
CMD ["--engine", "onnx"]
