#!/bin/sh
# After the files are gone: systemd forgets the unit. On purge dpkg removes
# the configuration and environment files itself; the state directory
# (/var/lib/otelcol-pgconsistency, made by systemd) goes too. The user stays
# (preinstall.sh says why).
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
  rm -rf /var/lib/otelcol-pgconsistency
fi
