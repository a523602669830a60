#!/bin/sh
# deb: $1 = remove (or upgrade). rpm: $1 = 0 on removal, 1 on an upgrade.
# On removal the service is stopped and disabled; an upgrade leaves it.
set -e
case "$1" in
  remove|0)
    if [ -d /run/systemd/system ]; then
      systemctl disable --now otelcol-pgconsistency.service >/dev/null 2>&1 || true
    fi
    ;;
esac
