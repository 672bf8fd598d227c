# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY courier_api ./courier_api
COPY sync ./sync
COPY models ./models
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    APP_ENV=production \
    INSTANCE_PATH=/var/lib/courier-api \
    SCHEDULER_IN_WEB=true
RUN useradd --system --create-home --uid 10001 courier \
 && mkdir -p /var/lib/courier-api \
 && chown courier /var/lib/courier-api
COPY --from=build /opt/venv /opt/venv
USER courier
WORKDIR /home/courier
# The default SQLite database, proof images and generated files live here.
VOLUME ["/var/lib/courier-api"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["sh", "-c", "courier-api db upgrade && exec courier-api serve --host 0.0.0.0 --port 8000 --workers ${WORKERS:-4}"]
