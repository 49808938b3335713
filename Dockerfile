# simplenn-serve: the inference server in a slim, non-root image that runs with a read-only root filesystem.
#
#   docker build -t simplenn-serve .                                          # CPU build (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t simplenn-serve:cuda .      # CUDA build (run with --gpus all)
#   docker run --read-only --tmpfs /tmp --tmpfs /var/lib/simplenn -p 8000:8000 -p 8001:8001 \
#       -v "$PWD/weights:/weights:ro" simplenn-serve
#
# Build arguments (docs/deploy.md has the details):
#   BASE_IMAGE       a Debian 12 (bookworm) image with apt; its python3 (3.11) runs the server.
#   TORCH_VARIANT    cpu:  torch's CPU wheel as pinned in requirements/cpu.txt, from TORCH_CPU_INDEX;
#                    cuda: the same torch version from PyPI, which bundles the CUDA runtime (the host
#                          needs only the NVIDIA driver and the NVIDIA container toolkit).
#   TORCH_CPU_INDEX  where the CPU wheel comes from.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX, PIP_CERT: pip's own settings, for mirrors and
#                    offline builds. Wheels in deploy/wheelhouse/ are always offered to pip
#                    (with PIP_NO_INDEX=1 they are the only source).
#
# Runtime contract: listens on SIMPLENN_HOST=0.0.0.0, SIMPLENN_PORT=8000 (HTTP) and SIMPLENN_GRPC_PORT=8001
# (gRPC: Open Inference Protocol and grpc.health.v1; 0 turns it off); serves the weights under /weights
# (replace a file by rename, or add a numbered version directory, and every process hot-reloads); writes
# only to /var/lib/simplenn (SIMPLENN_STATE_DIR) and /tmp; runs as uid:gid 10001:10001; SIGTERM drains.

ARG BASE_IMAGE=debian:bookworm-slim

# checkov:skip=CKV_DOCKER_7: FROM takes the BASE_IMAGE argument, which checkov does not resolve; its default is a release tag (bookworm), not latest
# --- stage 1: Debian's python3 (bookworm: 3.11) with an empty virtual environment ---------------------------
FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# --- stage 2: what to install: pyproject.toml's dependencies under requirements/cpu.txt's pins ----------------
# (for CUDA: the same pins, torch without its +cpu local version, from PyPI). A stage of its own so that
# the expensive install below is redone only when these two files' contents change, not all of pyproject.toml.
FROM python AS requirements
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml /src/
COPY requirements/ /src/requirements/
RUN mkdir /requirements \
    && case "${TORCH_VARIANT}" in \
      cpu)  cp requirements/cpu.txt /requirements/constraints.txt \
            && echo "--extra-index-url ${TORCH_CPU_INDEX}" > /requirements/requirements.txt ;; \
      cuda) sed -E 's/^(torch==[^+[:space:]]+)\+cpu/\1/' requirements/cpu.txt > /requirements/constraints.txt \
            && : > /requirements/requirements.txt ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 2 ;; \
    esac \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
       >> /requirements/requirements.txt

# --- stage 3: the dependencies installed ----------------------------------------------------------------------
FROM python AS deps
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_CERT
COPY deploy/wheelhouse/ /wheelhouse/
COPY --from=requirements /requirements/ /requirements/
# Then drop what serving never uses (C++ headers, C++ test binaries, pip) and put /opt/app (the server's
# code, copied in the last stage) on sys.path.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheelhouse \
       -c /requirements/constraints.txt -r /requirements/requirements.txt \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "${site}/torch/include" "${site}/torch/test" \
    && find "${site}/torch/bin" -type f ! -name 'torch_shm_manager' -delete \
    && /opt/venv/bin/pip uninstall --yes --disable-pip-version-check pip \
    && echo /opt/app > "${site}/simplenn-app.pth" \
    && /opt/venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# --- stage 4: the runtime image ---------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The same python3 as in the deps stage (the venv links to it); tini forwards signals and reaps children.
# /var/lib/simplenn has mode 1777 like /tmp: a `docker run --tmpfs` there takes that mode, so any uid
# (an OpenShift-style random one too) can write its state.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && groupadd --system --gid 10001 simplenn \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin simplenn \
    && install -d -o 10001 -g 10001 -m 1777 /var/lib/simplenn \
    && install -d -m 0755 /weights /opt/app

COPY --from=deps /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/app/healthcheck.py
# Default weights (the repository's), so the image serves out of the box; mount a volume on /weights instead.
COPY weights/model.pth /weights/model.pth
COPY models/ /opt/app/models/
COPY serve/ /opt/app/serve/
# Byte-code compiled now: the root filesystem is read-only at run time.
RUN /opt/venv/bin/python -m compileall -q /opt/app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIMPLENN_HOST=0.0.0.0 \
    SIMPLENN_PORT=8000 \
    SIMPLENN_GRPC_PORT=8001 \
    SIMPLENN_WEIGHTS=/weights \
    SIMPLENN_STATE_DIR=/var/lib/simplenn \
    TMPDIR=/tmp

LABEL org.opencontainers.image.title="simplenn-serve" \
      org.opencontainers.image.description="SimpleNN state_dict over REST (LitServe + torch), with hot reload of weights" \
      org.opencontainers.image.licenses="Apache-2.0"

WORKDIR /opt/app
USER 10001:10001
EXPOSE 8000 8001
# The server drains on SIGTERM (SIMPLENN_DRAIN_S), finishes in-flight requests and exits 0: give
# `docker stop -t` (Kubernetes: terminationGracePeriodSeconds) at least drain + the longest request.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/app/healthcheck.py"]

# Arguments after the image name are server flags: `docker run simplenn-serve --workers 2`.
ENTRYPOINT ["/usr/bin/tini", "--", "python3", "-m", "serve"]
CMD []
