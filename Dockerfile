# gpt-oss-server, CPU image (the default). GPU: docker/Dockerfile.cuda.
#
#   docker build -t gpt-oss-server .
#   docker run --rm -p 8000:8000 -v /path/to/gpt-oss-20b:/models/gpt-oss-20b:ro \
#     -e GPT_OSS_MODEL=/models/gpt-oss-20b gpt-oss-server
#
# Checkpoints go under /models (the model id clients use is the directory's name, or
# GPT_OSS_SERVED_MODEL_NAME); with no GPT_OSS_MODEL the server serves its bundled demo model.
# Every `gpt-oss-server serve --flag` is also the environment variable GPT_OSS_FLAG (see
# `docker run --rm gpt-oss-server --help`); arguments after the image name are serve flags.
#
# Build arguments:
#   BASE_IMAGE       a Debian-based image with python3 (>= 3.11) and its venv module
#   TORCH_SPEC       the torch to install
#   TORCH_INDEX_URL  an extra index holding the CPU build of torch (PyPI's torch is the CUDA
#                    build); empty: PyPI only (with a local CPU wheel in PIP_FIND_LINKS)
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for the fused CPU kernels, in this stage only (see the prebuild step below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch and what it needs go in a directory of their own (put on the venv's path by a .pth file):
# the image's largest layer, built first and the same from one version of the project to the next.
RUN pip install --target=/opt/torch ${TORCH_INDEX_URL:+--extra-index-url=$TORCH_INDEX_URL} "$TORCH_SPEC" \
    && python -c "import site; open(site.getsitepackages()[0] + '/torch.pth', 'w').write('/opt/torch\n')"
WORKDIR /src
COPY . .
# Not editable: the packages and their package data are copied into the venv.
RUN pip install . && pip check
# The fused CPU kernels (MXFP4 experts, decode matmuls, attention) compiled into the installed
# package: the runtime stage has no compiler, and without them it would serve with the PyTorch
# reference kernels, several times slower. -P: import the installed package, not /src's copy.
RUN python -P -m engine.kernels.prebuild

FROM ${BASE_IMAGE}
RUN useradd --user-group --uid 10001 --create-home --home-dir /home/gpt-oss gpt-oss \
    && mkdir -p /models /var/lib/gpt-oss-server \
    && chown gpt-oss:gpt-oss /var/lib/gpt-oss-server
COPY --from=builder /opt/torch /opt/torch
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GPT_OSS_HOST=0.0.0.0 \
    GPT_OSS_PORT=8000 \
    GPT_OSS_DEVICE=cpu \
    GPT_OSS_STATE_DIR=/var/lib/gpt-oss-server
# /models: checkpoints (either layout), mounted read-only is fine. The state directory holds
# stored responses (/v1/responses): mount a volume there to keep them across containers.
VOLUME ["/models", "/var/lib/gpt-oss-server"]
USER 10001:10001
WORKDIR /home/gpt-oss
EXPOSE 8000
# The server is PID 1 (exec form) and handles SIGTERM itself: it stops accepting connections,
# gives in-flight requests 5 s to finish, ends the streams still open after their last whole
# event, and exits 0: inside Docker's default 10 s stop timeout. A non-streaming request may run
# on up to 30 s; to let it, give `docker stop` more (`--stop-timeout 40`, compose
# `stop_grace_period`).
STOPSIGNAL SIGTERM
# 503 while the model loads, 200 once it serves. Slim images have no curl: Python asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GPT_OSS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["gpt-oss-server", "serve"]
