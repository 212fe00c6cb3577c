FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --uid 10001 intyg

USER intyg
# /metrics, /healthz, /readyz (METRICS_PORT). Liveness here; compose.yaml asks for readiness instead.
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["intygstjanst", "probe", "healthz"]
CMD ["intygstjanst", "serve"]
