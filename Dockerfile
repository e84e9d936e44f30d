# cxr web app and API on the torch-free runtime: one replica = one process holding the model once (about
# 150-200 MB; `cxr serve --workers N` for N processes). Not for clinical use.
#   docker build -t cxr .
#   docker run --rm -p 8000:8000 cxr            # then http://127.0.0.1:8000
#   docker run --rm -e PORT=5000 -p 5000:5000 cxr
# The offline page's browser runtime (onnxruntime-web's WASM build, dicom-parser), from npm at the versions
# package-lock.json pins: `npm ci` refuses any tarball whose sha512 differs from the lock. The same files
# scripts/vendor_web.py copies for a checkout; no CDN at run time.
FROM node:20-slim AS webvendor
WORKDIR /v
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund && mkdir out \
 && cp node_modules/onnxruntime-web/dist/ort.wasm.min.js node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs \
       node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm node_modules/dicom-parser/dist/dicomParser.min.js out/

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The runtime only: `pip install .` without [train] (onnxruntime, numpy, scipy, Pillow, pydicom, FastAPI,
# uvicorn; no torch, torchvision, Lightning, matplotlib, pandas or scikit-learn), at the lock's versions
# (requirements.lock as pip constraints: it pins what is installed, installs nothing by itself). The
# bundled model ships its ONNX artefacts (src/cxr/assets/cxr-demo.runtime.*), so `cxr serve` runs without
# torch; a model without them would fail to load here: export it with `cxr export` where torch is.
# Installed size of the site-packages this writes: see docs/DEPLOY.md ("Docker").
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
COPY --from=webvendor /v/out/ ./src/cxr/web/static/vendor/
RUN pip install -c requirements.lock . && rm -rf src build && python -c "from cxr import settings; \
from cxr.inference import artefacts; assert settings.BUNDLED_MODEL.is_file() \
and (settings.STATIC_DIR / 'index.html').is_file() \
and (settings.STATIC_DIR / 'vendor' / 'ort-wasm-simd-threaded.wasm').is_file() and artefacts.has_fresh_artefacts(settings.BUNDLED_MODEL)"

# Optional: --build-arg WITH_TORCH=1 adds CPU torch (the PyTorch CPU index: PyPI's x86_64 torch is the CUDA
# build, several GB) for models without ONNX artefacts; about 1 GB more per replica. Off by default.
ARG WITH_TORCH=0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ "$WITH_TORCH" = "1" ]; then pip install --index-url "$TORCH_INDEX" \
        "torch==$(sed -n 's/^torch==//p' requirements.lock)" \
        "torchvision==$(sed -n 's/^torchvision==//p' requirements.lock)"; fi

# Never run as root: a fixed unprivileged user that owns nothing it could change but its cache.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin cxr \
 && mkdir -p /app/cache && chown cxr /app/cache
USER cxr

# Heroku and most container platforms pass the port in $PORT; 8000 otherwise.
ENV PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)" || exit 1

# sh -c so ${PORT} is expanded at start (Heroku sets it then); exec so the server gets the signals.
CMD ["sh", "-c", "exec cxr serve --host 0.0.0.0 --port ${PORT:-8000} --workers ${CXR_WORKERS:-1}"]
