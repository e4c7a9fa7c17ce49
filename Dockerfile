# syntax=docker/dockerfile:1
# The gptq-gateway image: one stage builds the wheel (Rust extension, Python packages, generated
# gRPC code), the other runs it on a CUDA runtime base as a non-root user.
#
#   docker build -t REGISTRY/gptq-gateway:0.1.0 .
#   docker run --gpus all -v /path/to/checkpoints:/models -p 8000:8000 -p 50051:50051 \
#       REGISTRY/gptq-gateway:0.1.0                      # serves $GPTQGW_MODEL_DIR (/models/model)
#   docker run ... REGISTRY/gptq-gateway:0.1.0 serve /models/other --host 0.0.0.0
#   docker run ... REGISTRY/gptq-gateway:0.1.0 openai --upstream engine:50051 --host 0.0.0.0
#
# It needs a Docker engine with network access (crates.io, PyPI, the base images): the project's
# build machines have neither, so the image is built and pushed elsewhere (README.md says how).

FROM rust:1.95-slim-bookworm AS wheel
# Debian's own versions are what we want here; pinning them only breaks the build on updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# pip builds through the PEP 517 backend with pyproject.toml's build requirements (maturin, and
# grpcio-tools for native/build.rs, which compiles proto/ into gateway/proto_gen/).
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS runtime
# tini is PID 1: it forwards SIGTERM (the engine drains on it) and reaps compiler subprocesses.
# gcc, libc6-dev and python3-dev: Triton compiles a small C launcher the first time it runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 gptqgw \
    && useradd --uid 10001 --gid 10001 --home-dir /home/gptqgw --create-home \
        --shell /usr/sbin/nologin gptqgw
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN python3 -m venv /opt/gptq-gateway \
    && /opt/gptq-gateway/bin/pip install --no-cache-dir -c /tmp/constraints.txt /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/constraints.txt
# GPTQGW_MODEL_DIR: the checkpoint served when the container gets no arguments.
ENV PATH=/opt/gptq-gateway/bin:$PATH \
    HOME=/home/gptqgw \
    GPTQGW_MODEL_DIR=/models/model \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/gptqgw
# gRPC API, engine metrics, OpenAI-compatible HTTP API.
EXPOSE 50051 9400 8000
# Kubernetes runs its own probes; a Docker HEALTHCHECK would only fit one of the subcommands.
# checkov:skip=CKV_DOCKER_2:the image runs serve, openai or quantize; the chart probes each its own way
# No arguments: serve $GPTQGW_MODEL_DIR on every interface. Arguments: a gptq-gateway command line.
ENTRYPOINT ["/usr/bin/tini", "--", "/bin/sh", "-c", "[ \"$#\" -gt 0 ] || set -- serve \"$GPTQGW_MODEL_DIR\" --host 0.0.0.0; exec gptq-gateway \"$@\"", "gptq-gateway"]
