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

# -- runtime: the same base, no build tools, no shell use, non-root, read-only root friendly -----
FROM python:3.12.8-slim-bookworm
LABEL org.opencontainers.image.title="spiffe-oauth-sidecar" \
      org.opencontainers.image.description="Trade the pod's SPIFFE identity for DPoP-bound OAuth tokens for legacy apps" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/spiffe-oauth-sidecar/spiffe-oauth-sidecar"
COPY --from=build /opt/sidecar /opt/sidecar
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
