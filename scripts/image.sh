#!/usr/bin/env bash
# The OCI image of otelcol-pgconsistency, built without a container engine
# or registry access (make package; docs/install.md). FROM scratch, three
# layers:
#   1. /etc/passwd and /etc/group with the user pgconsistency (10001:10001),
#      an empty /tmp, and the CA certificates of Debian's ca-certificates
#      (/etc/ssl/certs/ca-certificates.crt, where Go looks first): the
#      receiver verifies the database's certificate against them;
#   2. the default configuration /etc/otelcol-pgconsistency/config.yaml
#      (config/collector-prometheus.yaml), the SQL under
#      /usr/share/pgconsistency/sql and the Grafana dashboard and
#      provisioning under /usr/share/pgconsistency/grafana, as in the packages;
#   3. the static binary /usr/bin/otelcol-pgconsistency.
# User 10001:10001, entrypoint the binary, command --config=<the default
# configuration>, the Prometheus exporter and health check on 0.0.0.0.
# crane assembles and configures it through a registry of its own that it
# serves in memory on 127.0.0.1 for the length of this script, then writes
# it as an OCI layout, archived in one tar file:
#   $DIST/otelcol-pgconsistency_$VERSION_linux_$ARCH.oci.tar
# Usage: CRANE=… VERSION=… ARCH=… scripts/image.sh DIST
set -euo pipefail

: "${CRANE:?CRANE: the crane binary (make package sets it)}"
: "${VERSION:?VERSION: the release (make package sets it from CHANGELOG.md)}"
: "${ARCH:?ARCH: the GOARCH of the binary (make package sets it)}"
dist=${1:?usage: scripts/image.sh DIST}
bin=_build/otelcol-pgconsistency
[ -x "$bin" ] || { echo "image.sh: $bin is missing: run make build" >&2; exit 1; }
# Reproducible layers: every file dated at the last commit (or at 0).
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

work=$(mktemp -d)
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# tar, reproducible: sorted, dated $epoch, owned by root
rtar() { tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner "$@"; }
layer() { # layer NAME DIR: DIR's entries as $work/NAME.tar
  (cd "$2" && rtar -cf "$work/$1.tar" -- *)
}
# crane, its progress log kept for when it fails
crane() {
  "$CRANE" "$@" 2>>"$work/crane.log" || { echo "image.sh: crane $1 failed:" >&2; cat "$work/crane.log" >&2; return 1; }
}

base=$work/base
mkdir -p "$base/etc" "$base/tmp"
chmod 1777 "$base/tmp"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\npgconsistency:x:10001:10001:otelcol-pgconsistency:/nonexistent:/usr/sbin/nologin\n' > "$base/etc/passwd"
printf 'root:x:0:\npgconsistency:x:10001:\n' > "$base/etc/group"
chmod 0644 "$base/etc/passwd" "$base/etc/group"
# The CA bundle of Debian's ca-certificates (install-deps.sh installs it).
cabundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$cabundle" ] || { echo "image.sh: $cabundle is missing: apt-get install ca-certificates" >&2; exit 1; }
install -D -m 0644 "$cabundle" "$base/etc/ssl/certs/ca-certificates.crt"
layer base "$base"

files=$work/files
install -D -m 0644 config/collector-prometheus.yaml "$files/etc/otelcol-pgconsistency/config.yaml"
install -d "$files/usr/share/pgconsistency/sql/framework"
install -m 0644 sql/*.sql "$files/usr/share/pgconsistency/sql/"
install -m 0644 sql/framework/*.sql "$files/usr/share/pgconsistency/sql/framework/"
(cd config/grafana && find . -type f | while read -r f; do
  install -D -m 0644 "$f" "$files/usr/share/pgconsistency/grafana/${f#./}"
done)
layer files "$files"

binary=$work/binary
install -D -m 0755 "$bin" "$binary/usr/bin/otelcol-pgconsistency"
layer binary "$binary"

"$CRANE" registry serve --address 127.0.0.1:0 2>"$work/registry.log" &
registry_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*serving on port \([0-9][0-9]*\).*/\1/p' "$work/registry.log")
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "image.sh: crane registry serve did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
ref=127.0.0.1:$port/otelcol-pgconsistency:$VERSION

crane append --oci-empty-base -f "$work/base.tar" -f "$work/files.tar" -f "$work/binary.tar" -t "$ref" >/dev/null
crane mutate "$ref" -t "$ref" \
  --set-platform "linux/$ARCH" \
  --user 10001:10001 \
  --workdir / \
  --entrypoint /usr/bin/otelcol-pgconsistency \
  --cmd=--config=/etc/otelcol-pgconsistency/config.yaml \
  --env PGCONSISTENCY_PROMETHEUS_ENDPOINT=0.0.0.0:9464 \
  --env PGCONSISTENCY_HEALTH_ENDPOINT=0.0.0.0:13133 \
  --exposed-ports 9464/tcp,13133/tcp \
  --label org.opencontainers.image.title=otelcol-pgconsistency \
  --label org.opencontainers.image.version="$VERSION" \
  --label org.opencontainers.image.description="OpenTelemetry Collector with the pgconsistency receiver" >/dev/null
crane pull --format oci "$ref" "$work/layout"
out=$dist/otelcol-pgconsistency_${VERSION}_linux_${ARCH}.oci.tar
(cd "$work/layout" && rtar --mode=u=rwX,go=rX -cf - oci-layout index.json blobs) > "$out"
echo "image: $out ($(du -h "$out" | cut -f1), $(crane digest "$ref"))"
