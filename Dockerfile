# CPU image for `carclf serve`: ONNX Runtime (or PyTorch) behind FastAPI/uvicorn, the upload page at /.
#
#   carclf export runs/cpu-lite0 -o export/cpu-lite0 --int8          # on the training machine
#   docker build -t carclf-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/export/cpu-lite0:/model:ro" carclf-serve
#   docker run ... -e CARCLF_API_KEY=... carclf-serve carclf serve /model --host 0.0.0.0 --api-key-env CARCLF_API_KEY
#
# The model is mounted, not baked in: one image serves any export (its version is in /v1/model and /metrics).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch and torchvision (the default wheels bundle CUDA: gigabytes the service never uses). torch stays
# because the eval transform is timm/torchvision's, the same code as training (and a run directory can be served
# on PyTorch too).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.4" "torchvision>=0.19"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 10001 carclf

USER carclf
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
# One worker per container uses every core for its engines; scale with containers, or --workers N for N processes.
# docker stop kills 10 s after SIGTERM: finish requests in flight within 8 s (serve's own default is 20 s).
CMD ["carclf", "serve", "/model", "--host", "0.0.0.0", "--port", "8000", "--shutdown-timeout", "8"]
