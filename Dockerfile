# security-mailer: `mailer serve` as an unprivileged user, PID 1, state in one volume.
#
#   docker build --network host -t security-mailer .
#   docker run -d --name mailer -v mailer-var:/srv/mailer/var -p 8025:8025 -p 8024:8024 \
#       -e MAILER_SERVICE_CONTACT=security@example.org -e MAILER_RELAY_URL=smtp://mta:587 security-mailer
#
# The base is Debian's (Python, venv and GnuPG are Debian packages). Where no registry can be
# reached, `docker/build-base` builds debian:bookworm-slim locally with debootstrap.
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title=security-mailer

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv gnupg ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mailer \
 && useradd --system --uid 10001 --gid mailer --home-dir /srv/mailer --shell /usr/sbin/nologin mailer \
 && install -d -o mailer -g mailer -m 0750 /srv/mailer \
 && install -d -o mailer -g mailer -m 0700 /srv/mailer/var \
 && install -d -o mailer -g mailer -m 0700 /srv/mailer/var/gnupg

# Behind a TLS-intercepting proxy pip needs its CA: --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.crt)".
# It is used for the pip downloads only and not kept in the image.
ARG EXTRA_CA_CERTS=""
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml /opt/security-mailer/pyproject.toml
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      cat /etc/ssl/certs/ca-certificates.crt > /tmp/pip-ca.pem \
      && printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/pip-ca.pem \
      && export PIP_CERT=/tmp/pip-ca.pem; \
    fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --quiet --upgrade pip setuptools wheel \
 && python3 -c 'import tomllib, sys; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
      /opt/security-mailer/pyproject.toml > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --quiet -r /tmp/requirements.txt \
 && rm -f /tmp/requirements.txt /tmp/pip-ca.pem

# The code. Migrations and templates are found next to the packages, so the tree stays in place.
WORKDIR /opt/security-mailer
COPY README.md ./
COPY mailer ./mailer
COPY inbound ./inbound
COPY outbound ./outbound
COPY migrations ./migrations
COPY templates ./templates
COPY config ./config
COPY docker/entrypoint /usr/local/bin/mailer-entrypoint
RUN chmod 0755 /usr/local/bin/mailer-entrypoint \
 && /opt/venv/bin/pip install --no-cache-dir --quiet --no-deps --no-build-isolation -e . \
 && /opt/venv/bin/python -m compileall -q mailer inbound outbound migrations \
 && /opt/venv/bin/mailer --help >/dev/null

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MAILER_SERVICE_DATA_DIR=/srv/mailer/var \
    MAILER_GNUPG_HOME=/srv/mailer/var/gnupg \
    MAILER_SMTP_LISTEN=0.0.0.0:8025 \
    MAILER_LMTP_LISTEN=0.0.0.0:8024
USER mailer
WORKDIR /srv/mailer
# The SQLite database, the GnuPG home (service key) and the outgoing maildir; created above,
# owned by the service user, so a fresh named volume starts with the right owner.
VOLUME ["/srv/mailer/var"]
# 8025 SMTP, 8024 LMTP (Postfix's lmtp transport, see docs/postfix.md)
EXPOSE 8025 8024
# `mailer health` exits 1 (degraded) or 2 (down); Docker reserves 2, so every problem is reported as 1.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 CMD mailer health || exit 1
STOPSIGNAL SIGTERM
# `db upgrade` then `exec mailer serve` (unless MAILER_SKIP_MIGRATE=1); other arguments run `mailer ARGS`.
ENTRYPOINT ["/usr/local/bin/mailer-entrypoint"]
CMD ["serve"]
