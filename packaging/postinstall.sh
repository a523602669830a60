#!/bin/sh
# deb: $1 = configure, $2 = the version upgraded from (empty on a first
# install). rpm: $1 = 1 on a first install, 2 on an upgrade.
# The service is not started on a first install: it needs the database
# password first. An upgrade restarts it if it runs.
set -e
first=
case "$1" in
  configure) [ -n "${2:-}" ] || first=1 ;;
  1) first=1 ;;
esac
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
  if [ -z "$first" ]; then
    systemctl try-restart otelcol-pgconsistency.service >/dev/null 2>&1 || true
  fi
fi
if [ -n "$first" ]; then
  echo "otelcol-pgconsistency: set the database in /etc/otelcol-pgconsistency/otelcol-pgconsistency.env,"
  echo "then: systemctl enable --now otelcol-pgconsistency (see /usr/share/doc/otelcol-pgconsistency/install.md)"
fi
