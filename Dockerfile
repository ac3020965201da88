# SMTP relay gateway container image.
#   docker build -t gateway .
#   docker run -p 25:2525 -p 587:2587 -p 465:2465 -p 8025:8025 \
#     -v /etc/gateway:/etc/gateway:ro -v gateway-data:/var/lib/gateway \
#     -e GATEWAY_ADMIN_KEY=... -e GATEWAY_REGISTRY_SECRET=... -e GATEWAY_PUBLIC_URL=https://... gateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
 && groupadd --system gateway \
 && useradd --system --gid gateway --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /var/lib/gateway /etc/gateway \
 && chown gateway:gateway /var/lib/gateway

# Non-root: the listeners use unprivileged ports; map 25/587/465 to them.
USER gateway
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 2525 2587 2465 8025

ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8025/readyz', timeout=2)" || exit 1
# SIGTERM drains (smtp.grace_period); give docker stop at least that long: docker stop -t 40
STOPSIGNAL SIGTERM
CMD ["gateway", "serve"]
