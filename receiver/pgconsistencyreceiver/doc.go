//go:generate make -C ../.. generate

// Package pgconsistencyreceiver reads the snapshot of data-consistency
// invariants that PostgreSQL keeps in the pgconsistency schema (see sql/ at the
// root of this repository) and turns it into one gauge per invariant; in a
// logs pipeline, into one log record per new anomaly. README.md says how to
// configure it.
//
// The heavy checks run in the database, as refreshes that keep each
// invariant's anomalies; each scrape runs a single cheap query on
// pgconsistency.status.
package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"
