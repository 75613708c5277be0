# syntax=docker/dockerfile:1
# One image for every xo-csi service; the command picks the service:
#   xo-csi-frontend --mode controller|node   CSI controller (non-root) or node plugin (needs root + privileged)
#   xo-csi-migrator                           migration worker (non-root)
#   xo-sim                                    XO JSON-RPC simulator (development, tests, demo)
#   xocsi                                     operator CLI (CSI RPCs, `xocsi jobs`)
# There is no ENTRYPOINT: `docker run IMAGE xo-csi-migrator --help` works, and so does `command:` in Compose/k8s.
# Build: docker build -t xo-csi:dev .    (the build context is filtered by .dockerignore: pyproject, README, code)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a virtualenv (every dependency ships wheels) ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/xo-csi
WORKDIR /src
# pyproject first: a code-only change keeps nothing but the last layer to redo
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN /opt/xo-csi/bin/pip install . \
 && /opt/xo-csi/bin/xo-csi-frontend --help >/dev/null \
 && /opt/xo-csi/bin/xo-csi-migrator --help >/dev/null \
 && /opt/xo-csi/bin/xo-sim --help >/dev/null \
 && /opt/xo-csi/bin/xocsi --help >/dev/null

# --- runtime ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="xo-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver for XCP-ng pools managed by Xen Orchestra (csi.xen-orchestra.marcsi.ch)" \
      org.opencontainers.image.licenses="Apache-2.0"
# The node plugin's tools: blkid, blockdev (util-linux), mount/umount (mount), mkfs.ext3/ext4 + resize2fs
# (e2fsprogs), mkfs.xfs + xfs_growfs (xfsprogs). See services/csi_frontend/mounter.py.
# Unpinned on purpose: the base image's Debian release fixes the series, and a rebuild picks up security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
# Non-root by default (controller, migrator, simulator); the node DaemonSet runs this image as root, privileged.
RUN groupadd --system --gid 10001 xocsi \
 && useradd --system --uid 10001 --gid xocsi --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin xocsi
COPY --from=build /opt/xo-csi /opt/xo-csi
ENV PATH=/opt/xo-csi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# A sensible default for `docker run IMAGE`: the usage of the main service.
CMD ["xo-csi-frontend", "--help"]
