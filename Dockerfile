# CPU image: serves the packaged demo checkpoint, so it starts offline with no download.
#   docker build -t cryolens-server .
#   docker run -p 8023:8023 cryolens-server
# Another checkpoint: mount it and pass CRYOLENS_CHECKPOINT=/models/model.ckpt (or --checkpoint).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the CPU-only index (no CUDA libraries: ~10x smaller), in its own layer.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY src ./src
COPY client ./client
RUN pip install ./client . && useradd --create-home --uid 1000 cryolens

USER cryolens
ENV CRYOLENS_DEVICE=cpu \
    CRYOLENS_CACHE_DIR=/home/cryolens/.cache/cryolens
EXPOSE 8023

HEALTHCHECK --interval=30s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8023/health', timeout=2)"

CMD ["cryolens-server", "--checkpoint", "demo", "--host", "0.0.0.0", "--port", "8023", "--device", "cpu"]
