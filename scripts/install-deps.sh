#!/usr/bin/env bash
# Installs what the tests and the demo need, when it is missing: the
# PostgreSQL 15 server, pg_cron, wal2json (the WAL capture's decoding), psql, PgBouncer (pgtest starts one in front
# of a test server), Prometheus (remote write receiver, promtool),
# Alertmanager (amtool), npm (make lint installs squawk with it), rpm (the
# packaging test lists the .rpm's files with rpm -qlp), and the
# de_DE.UTF-8 locale (generated with localedef). On Debian as root it runs apt-get; elsewhere it
# says what to install.
# `install-deps.sh bench` also installs what make bench compares with and
# loads the database with: prometheus-postgres-exporter and pgbench.
set -euo pipefail

pkgs=()
if [ "${1:-}" = bench ]; then
  command -v prometheus-postgres-exporter >/dev/null 2>&1 || pkgs+=(prometheus-postgres-exporter)
  if ! command -v pgbench >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
    pkgs+=(postgresql-15)
  fi
fi
pg_bindir=$(pg_config --bindir 2>/dev/null || true)
pg_libdir=$(pg_config --pkglibdir 2>/dev/null || true)
if [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; then
  # pg_config may be missing while the server is installed (no -dev package)
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    pkgs+=(postgresql-15)
  fi
fi
if ! ls ${pg_libdir:-/usr/lib/postgresql/*/lib}/pg_cron.so /usr/lib/postgresql/*/lib/pg_cron.so >/dev/null 2>&1; then
  pkgs+=(postgresql-15-cron)
fi
# The WAL capture's output plugin (logical decoding: set_capture('wal')).
if ! ls ${pg_libdir:-/usr/lib/postgresql/*/lib}/wal2json.so /usr/lib/postgresql/*/lib/wal2json.so >/dev/null 2>&1; then
  pkgs+=(postgresql-15-wal2json)
fi
command -v psql >/dev/null 2>&1 || pkgs+=(postgresql-client-15)
# Debian puts pgbouncer in /usr/sbin, which may not be on a user's PATH.
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  pkgs+=(pgbouncer)
fi
command -v prometheus >/dev/null 2>&1 || pkgs+=(prometheus)
command -v amtool >/dev/null 2>&1 || pkgs+=(prometheus-alertmanager)
command -v curl >/dev/null 2>&1 || pkgs+=(curl)
# The image carries Debian's CA bundle (scripts/image.sh).
[ -s /etc/ssl/certs/ca-certificates.crt ] || pkgs+=(ca-certificates)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
command -v rpm >/dev/null 2>&1 || pkgs+=(rpm)

# A second message locale for the server: the SQL tests check that a refresh
# tells a timeout from a cancel whatever language the server speaks.
need_locale=
if ! locale -a 2>/dev/null | grep -qix 'de_DE.utf8'; then
  need_locale=1
  command -v localedef >/dev/null 2>&1 || pkgs+=(locales)
fi

generate_locale() {
  if [ -n "$need_locale" ] && [ "$(id -u)" -eq 0 ]; then
    localedef -i de_DE -f UTF-8 de_DE.UTF-8
  fi
}

if [ ${#pkgs[@]} -eq 0 ]; then
  generate_locale
  if [ -n "$need_locale" ] && [ "$(id -u)" -ne 0 ]; then
    echo "missing: the de_DE.UTF-8 locale (for the SQL tests); as root: localedef -i de_DE -f UTF-8 de_DE.UTF-8" >&2
    exit 1
  fi
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The Debian postgresql package starts a cluster on 5432 (and pgbouncer's
  # service may listen on 6432); the tests never use them, they start their
  # own on free ports.
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  generate_locale
  exit 0
fi
echo "missing: ${pkgs[*]}" >&2
echo "install them (Debian: sudo apt-get install -y ${pkgs[*]}), run this as root on Debian," >&2
echo "or, for the SQL and receiver tests alone, point PGCONSISTENCY_TEST_DSN at a PostgreSQL superuser URL." >&2
exit 1
