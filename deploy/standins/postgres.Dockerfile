# Stand-in for postgres:17.x-bookworm: Debian bookworm's PostgreSQL 15 behind an entrypoint honouring
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and PGDATA=/var/lib/postgresql/data, so compose.yaml's
# environment, volume and `pg_isready` healthcheck run as is.
ARG DEBIAN_IMAGE=vqtrain-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql && chmod 700 "$PGDATA"
COPY postgres-entrypoint /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
