# syntax=docker/dockerfile:1
# spiffe-oauth-sidecar: `sidecar run` (the default), `sidecar inject`, `sidecar webhook`.
# Checked by tests/test_packaging.py (hadolint and the properties below); no engine runs in CI.

# -- build: a virtualenv with the package and its wheels ------------------------------------------
FROM python:3.12.8-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --no-compile . \
    && /opt/sidecar/bin/python -m compileall -q /opt/sidecar/lib

# -- iptables for `sidecar iptables` (transparent capture's init container): the nf_tables
# multi-call binary under the four names it answers to, its libraries and xtables extensions,
# gathered under /out so the runtime stage copies them without running anything.
FROM python:3.12.8-slim-bookworm AS iptables
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 \
    && mkdir -p /out/usr/sbin \
    && for tool in iptables-save iptables-restore ip6tables-save ip6tables-restore; do \
         cp /usr/sbin/xtables-nft-multi "/out/usr/sbin/$tool"; done \
    && ldd /usr/sbin/xtables-nft-multi | awk '/=> \// {print $3}' | while read -r lib; do \
         dir="/out$(realpath "$(dirname "$lib")")"; mkdir -p "$dir"; cp -L "$lib" "$dir/"; done \
    && xt="$(realpath /usr/lib/*-linux-gnu/xtables)" && mkdir -p "/out$xt" && cp -a "$xt/." "/out$xt/" \
    && rm -rf /var/lib/apt/lists/*

# -- runtime: the same base, no build tools, no shell use, non-root, read-only root friendly -----
FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="spiffe-oauth-sidecar" \
      org.opencontainers.image.description="Trade the pod's SPIFFE identity for DPoP-bound OAuth tokens for legacy apps" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/spiffe-oauth-sidecar/spiffe-oauth-sidecar"
COPY --from=build /opt/sidecar /opt/sidecar
COPY --from=iptables /out/ /
COPY config/sidecar.yaml /etc/sidecar/sidecar.yaml
# Bytecode was compiled at build time; nothing is written to the image at run time.
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml
# 65532: the conventional "nonroot" uid/gid; numeric so runAsNonRoot can verify it.
USER 65532:65532
# The admin port (health, readiness, metrics). The proxy port listens on loopback only.
EXPOSE 15000
ENTRYPOINT ["sidecar"]
CMD ["run"]
