# cxr web app and API: one replica = one process holding the model once. Not for clinical use.
#   docker build -t cxr .
#   docker run --rm -p 8000:8000 cxr            # then http://127.0.0.1:8000
#   docker run --rm -e PORT=5000 -p 5000:5000 cxr
FROM python:3.11-slim

# tcmalloc: PyTorch runs about twice as fast on CPU with it (cxr re-execs itself under it when present).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# requirements.lock pins torch==2.14.1, which on x86_64 PyPI is the CUDA build (several GB of nvidia-*
# wheels). The image runs on CPU: install the CPU wheels of the same torch/torchvision versions from the
# PyTorch CPU index, then everything else from the lock minus the CUDA packages and the test-only tools.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.lock ./
RUN pip install --index-url "$TORCH_INDEX" \
        "torch==$(sed -n 's/^torch==//p' requirements.lock)" \
        "torchvision==$(sed -n 's/^torchvision==//p' requirements.lock)" \
 && grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|playwright|pytest|pytest-xdist|execnet|iniconfig|pluggy|greenlet|scikit-image|onnxscript|onnx-ir|ruff|import-linter|grimp)==' \
        requirements.lock > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package, with the bundled model under src/cxr/assets/ and the page under src/cxr/web/static/.
# A plain (not editable) install, as `pip install .` anywhere: cxr finds its model and page through
# importlib.resources (package-data in pyproject.toml; tests/test_packaging.py checks such an install).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . && rm -rf src build && python -c "from cxr import settings; \
assert settings.BUNDLED_MODEL.is_file() and (settings.STATIC_DIR / 'index.html').is_file()"

# Never run as root: a fixed unprivileged user that owns nothing it could change but its cache.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cxr \
 && mkdir -p /app/cache && chown cxr /app/cache
USER cxr

# The Predictor runs the model through ONNX Runtime, exporting it once per checkpoint into this cache.
# Export the bundled model now, so that each replica starts in seconds (readable by any user the platform
# runs the container as; a replica that cannot use the cache exports in memory instead).
ENV CXR_CACHE=/app/cache
RUN python -c "from cxr import settings; from cxr.inference.predictor import Predictor; \
settings.BUNDLED_MODEL.is_file() and Predictor()"

# Heroku and most container platforms pass the port in $PORT; 8000 otherwise.
ENV PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)" || exit 1

# sh -c so ${PORT} is expanded at start (Heroku sets it then); exec so the server gets the signals.
CMD ["sh", "-c", "exec cxr serve --host 0.0.0.0 --port ${PORT:-8000}"]
