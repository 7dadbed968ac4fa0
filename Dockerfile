# First version: runs `mailer serve` as an unprivileged user. Hardening comes later.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /srv/mailer --uid 10001 mailer

WORKDIR /opt/security-mailer
COPY pyproject.toml README.md ./
COPY mailer ./mailer
COPY inbound ./inbound
COPY outbound ./outbound
COPY migrations ./migrations
COPY templates ./templates
COPY config ./config
RUN pip install --no-cache-dir -e .

USER mailer
ENV MAILER_SERVICE_DATA_DIR=/srv/mailer/var \
    MAILER_SMTP_LISTEN=0.0.0.0:8025 \
    PYTHONUNBUFFERED=1
VOLUME ["/srv/mailer/var"]
EXPOSE 8025
HEALTHCHECK --interval=60s --timeout=20s CMD mailer health || exit 1
# Migrate, then serve; the MTA hands mail over on 8025 (SMTP) or an LMTP port set by MAILER_LMTP_LISTEN.
CMD ["sh", "-c", "mailer db upgrade && exec mailer serve"]
