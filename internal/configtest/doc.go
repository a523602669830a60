// Package configtest checks the shipped files of config/ that no server
// needs to read: the Grafana dashboard and alert provisioning against the
// Prometheus alert rules. Its tests are unit tests (make test-unit); the
// rules themselves are tested by promtool (make check-alerting) and in a
// real Prometheus (internal/e2e).
package configtest
