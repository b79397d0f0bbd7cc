# Test stand-in for the postgres image: Debian's PostgreSQL 15 on a local Debian base, taking the
# same POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / PGDATA settings.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data && chown -R postgres:postgres /var/lib/postgresql
COPY docker/test/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/pgdata
USER postgres
EXPOSE 5432
CMD ["postgres-entrypoint"]
