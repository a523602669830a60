// Package sqltest holds the tests of the SQL that ships in sql/: each
// invariant against the fixtures of testdata/, the refresh and its steps,
// incremental refresh and capture, upgrades from every release of
// testdata/sql/, privileges. They run against real PostgreSQL clusters the
// tests start (internal/pgtest), so they are behind the integration build
// tag: make test-sql, or go test -tags integration ./internal/sqltest/.
//
// They live here, not in sql/, so that sql/ holds only what is installed.
package sqltest
