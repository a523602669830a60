#!/bin/sh
# Before the files are unpacked (the environment file belongs to group
# pgconsistency): the system user and group the service runs as. Kept on
# removal and purge, as Debian does with system users (files it wrote may
# remain); `userdel pgconsistency` removes it.
set -e
if ! getent group pgconsistency >/dev/null 2>&1; then
  groupadd --system pgconsistency
fi
if ! getent passwd pgconsistency >/dev/null 2>&1; then
  useradd --system --gid pgconsistency --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment 'otelcol-pgconsistency service' pgconsistency
fi
