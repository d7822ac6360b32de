# syntax=docker/dockerfile:1
# One image for every FreshRec process: `freshrec serve ranking|updater`, `freshrec materialize`,
# `freshrec init`. Build from the repository root:
#   docker build -t freshrec:0.1.0 .
# GPU variant for the updater (PyPI's Linux torch wheels are the CUDA builds):
#   docker build -t freshrec-gpu:0.1.0 --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: generate the gRPC stubs (gitignored, so never in a clean checkout) ---
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN pip install "grpcio-tools>=1.60"
WORKDIR /src
COPY . .
# The runtime installs exactly the grpcio/protobuf that generated the stubs: generated code checks
# that the runtime is not older than the generator, so a drift between stages fails at import.
RUN python -m grpc_tools.protoc -I protos \
        --python_out=. --pyi_out=. --grpc_python_out=. protos/freshrec/v1/*.proto \
    && pip freeze | grep -iE '^(grpcio|protobuf)==' > /src/constraints.txt

# --- runtime ---
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
# torch goes in first, pinned, from the CPU wheel index: from PyPI pip pulls the CUDA build and its
# nvidia-* wheels (several GB) that the ranking service, materialize and init never use. The
# project's range (torch>=2.4,<=2.14.1) admits this wheel, so `pip install` below keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY --from=build /src /opt/freshrec
# Installed in place (editable), not as a wheel: the Feast definitions live in the repository's
# top-level feature_repo/, outside the packages, and are found relative to the source tree.
# The torch pin in the constraints makes a dependency that wants another torch fail the build
# instead of silently replacing the wheel installed above.
RUN echo "torch==${TORCH_VERSION}" >> /opt/freshrec/constraints.txt \
    && pip install --constraint /opt/freshrec/constraints.txt --editable /opt/freshrec

# Non-root, with a fixed uid/gid so Kubernetes' runAsNonRoot can check it and fsGroup matches.
# /var/lib/freshrec is created here, owned by that user: Docker copies the ownership into a fresh
# named volume mounted there, so the shared state is writable without a root init step.
RUN groupadd --system --gid 10001 freshrec \
    && useradd --system --uid 10001 --gid freshrec --create-home --home-dir /home/freshrec \
        --shell /usr/sbin/nologin freshrec \
    && mkdir -p /var/lib/freshrec \
    && chown freshrec:freshrec /var/lib/freshrec
USER 10001:10001
WORKDIR /home/freshrec
ENV FRESHREC_WORKDIR=/var/lib/freshrec

# 50051: ranking (RankingService), 50052: updater (UpdaterService), 9090: ranking metrics.
EXPOSE 50051 50052 9090
ENTRYPOINT ["freshrec"]
CMD ["--help"]
