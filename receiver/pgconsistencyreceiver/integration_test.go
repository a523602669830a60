//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/config/configopaque"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// snapshot is what one scrape said: value per metric name and invariant
// ("" for database-wide metrics, "invariant/outcome" for
// pgconsistency.refresh.outcome, "invariant/mode" for
// pgconsistency.refresh.mode, "/capture" for pgconsistency.capture.invariants),
// plus the resource attributes.
type snapshot struct {
	values   map[string]map[string]float64
	resource map[string]any
}

func (s snapshot) get(metric, invariant string) (float64, bool) {
	v, ok := s.values[metric][invariant]
	return v, ok
}

func lastSnapshot(sink *consumertest.MetricsSink) (snapshot, bool) {
	all := sink.AllMetrics()
	if len(all) == 0 {
		return snapshot{}, false
	}
	md := all[len(all)-1]
	s := snapshot{values: map[string]map[string]float64{}, resource: map[string]any{}}
	for i := 0; i < md.ResourceMetrics().Len(); i++ {
		rm := md.ResourceMetrics().At(i)
		rm.Resource().Attributes().Range(func(k string, v pcommon.Value) bool {
			s.resource[k] = v.AsRaw()
			return true
		})
		for j := 0; j < rm.ScopeMetrics().Len(); j++ {
			ms := rm.ScopeMetrics().At(j).Metrics()
			for k := 0; k < ms.Len(); k++ {
				m := ms.At(k)
				dps := m.Gauge().DataPoints()
				for d := 0; d < dps.Len(); d++ {
					dp := dps.At(d)
					inv, _ := dp.Attributes().Get("invariant")
					key := inv.Str()
					if outcome, ok := dp.Attributes().Get("outcome"); ok {
						key += "/" + outcome.Str()
					}
					if mode, ok := dp.Attributes().Get("mode"); ok {
						key += "/" + mode.Str()
					}
					if capture, ok := dp.Attributes().Get("capture"); ok {
						key += "/" + capture.Str()
					}
					v := dp.DoubleValue()
					if dp.ValueType() == pmetric.NumberDataPointValueTypeInt {
						v = float64(dp.IntValue())
					}
					if s.values[m.Name()] == nil {
						s.values[m.Name()] = map[string]float64{}
					}
					s.values[m.Name()][key] = v
				}
			}
		}
	}
	return s, true
}

// The integration tests each start a cluster of their own and mostly wait
// (for scrapes, schedules, servers stopping and starting): they run in
// parallel (t.Parallel), go test's -parallel at a time.

// serverConfig is a receiver configuration for database db of srv.
func serverConfig(srv *pgtest.Server, db string) *Config {
	cfg := createDefaultConfig()
	cfg.Endpoint = srv.Host + ":" + strconv.Itoa(srv.Port)
	cfg.Username = srv.User
	cfg.Password = configopaque.String(srv.Password)
	cfg.Database = db
	cfg.TLS.Insecure = true // the throwaway cluster has no TLS
	return cfg
}

// quietInterval and quietTimeout are the collection interval and timeout
// of the tests that assert that nothing is logged at error level. A scrape
// (or a connection) over its timeout logs an error, and on a loaded
// machine (make test runs tests side by side on two cores) 200 ms is not
// always enough: those tests flaked so.
const (
	quietInterval = time.Second
	quietTimeout  = 900 * time.Millisecond
)

func startReceiver(t *testing.T, srv *pgtest.Server, db string, opts ...func(*Config)) (*consumertest.MetricsSink, receiver.Metrics) {
	t.Helper()
	cfg := serverConfig(srv, db)
	cfg.CollectionInterval = 250 * time.Millisecond
	cfg.Timeout = 200 * time.Millisecond
	for _, o := range opts {
		o(cfg)
	}
	sink := new(consumertest.MetricsSink)
	rcv, err := NewFactory().CreateMetrics(t.Context(), receivertest.NewNopSettings(metadata.Type), cfg, sink)
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	return sink, rcv
}

// waitFor polls the newest scrape until check passes, then returns it.
func waitFor(t *testing.T, sink *consumertest.MetricsSink, what string, check func(snapshot) error) snapshot {
	t.Helper()
	var last error
	var snap snapshot
	ok := assert.Eventually(t, func() bool {
		s, ok := lastSnapshot(sink)
		if !ok {
			last = fmt.Errorf("no scrape yet")
			return false
		}
		if last = check(s); last != nil {
			return false
		}
		snap = s
		return true
	}, 60*time.Second, 50*time.Millisecond)
	require.True(t, ok, "%s: %v", what, last)
	return snap
}

func expectCounts(want map[string]int) func(snapshot) error {
	return func(s snapshot) error {
		if up, _ := s.get("pgconsistency.up", ""); up != 1 {
			return fmt.Errorf("pgconsistency.up = %v", up)
		}
		for _, inv := range fixture.Invariants {
			got, ok := s.get("pgconsistency.anomalies", inv)
			if !ok || got != float64(want[inv]) {
				return fmt.Errorf("pgconsistency.anomalies{invariant=%s} = %v (present %v), want %d", inv, got, ok, want[inv])
			}
		}
		return nil
	}
}

// TestIntegrationExactGauges: the receiver, created through its factory,
// reports the exact counts of the fixtures, then follows a new breakage.
func TestIntegrationExactGauges(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, fixture.Invariants...)
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)

	sink, _ := startReceiver(t, srv, db)
	want := map[string]int{}
	for inv, broken := range fixture.Breakage {
		want[inv] = len(broken)
	}
	snap := waitFor(t, sink, "fixture counts", expectCounts(want))

	assert.Equal(t, map[string]any{
		"postgresql.database.name": db,
		"server.address":           srv.Host,
		"server.port":              int64(srv.Port),
	}, snap.resource)
	for _, inv := range fixture.Invariants {
		newCount, _ := snap.get("pgconsistency.anomalies.new", inv)
		assert.EqualValues(t, want[inv], newCount, "first refresh: every anomaly is new (%s)", inv)
		failures, ok := snap.get("pgconsistency.refresh.failures", inv)
		assert.True(t, ok)
		assert.Zero(t, failures, inv)
		ts, _ := snap.get("pgconsistency.snapshot.timestamp", inv)
		assert.InDelta(t, float64(time.Now().Unix()), ts, 300, "snapshot time of %s", inv)
		_, ok = snap.get("pgconsistency.refresh.duration", inv)
		assert.True(t, ok, inv)
	}

	// One more dataset loses its Seed (the incident's shape): after the
	// refresh the gauge moves from 3 to 4 and exactly one anomaly is new.
	_, err = conn.Exec(t.Context(),
		"DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type IN ('Seed', 'SetDataSchema')",
		fixture.DatasetID(2))
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh(force => true)")
	require.NoError(t, err)
	want["dataset_seed_missing"]++
	snap = waitFor(t, sink, "after breaking dataset 2", expectCounts(want))
	newCount, _ := snap.get("pgconsistency.anomalies.new", "dataset_seed_missing")
	assert.EqualValues(t, 1, newCount)
	other, _ := snap.get("pgconsistency.anomalies.new", "dataset_head_ref_missing")
	assert.EqualValues(t, 0, other, "unchanged invariants have no new anomalies")

	// A new invariant registered in SQL shows up without a config change.
	_, err = conn.Exec(t.Context(), `SELECT pgconsistency.define_invariant('owner_without_name',
		$q$ SELECT dataset_id::text AS key FROM public.dataset_entries WHERE owner_name = '' $q$, 'info')`)
	require.NoError(t, err)
	waitFor(t, sink, "new invariant", func(s snapshot) error {
		if _, ok := s.get("pgconsistency.anomalies", "owner_without_name"); !ok {
			return fmt.Errorf("owner_without_name not reported")
		}
		if ts, _ := s.get("pgconsistency.snapshot.timestamp", "owner_without_name"); ts != 0 {
			return fmt.Errorf("never refreshed, yet snapshot timestamp %v", ts)
		}
		return nil
	})
}

// expectDown checks that the scrape reported pgconsistency.up = 0.
func expectDown(s snapshot) error {
	if up, ok := s.get("pgconsistency.up", ""); !ok || up != 0 {
		return fmt.Errorf("pgconsistency.up = %v (present %v), want 0", up, ok)
	}
	return nil
}

// receiverOnBrokenHeads starts a cluster whose database has 3 datasets
// without a head reference, refreshed, and a receiver on it; it returns the
// counts the receiver must report.
func receiverOnBrokenHeads(t *testing.T) (*pgtest.Server, *consumertest.MetricsSink, map[string]int) {
	t.Helper()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_head_ref_missing")
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	require.NoError(t, conn.Close(t.Context()))
	sink, _ := startReceiver(t, srv, db)
	return srv, sink, map[string]int{"dataset_head_ref_missing": 3}
}

// TestIntegrationDatabaseDownAndBack: with the database stopped, up is 0;
// when it starts again, up is 1 and the counts are back, with no restart of
// the receiver.
func TestIntegrationDatabaseDownAndBack(t *testing.T) {
	t.Parallel()
	srv, sink, want := receiverOnBrokenHeads(t)
	waitFor(t, sink, "before the outage", expectCounts(want))

	srv.Stop(t)
	snap := waitFor(t, sink, "during the outage", expectDown)
	assert.Len(t, snap.values, 1, "with the database down only pgconsistency.up is reported")

	srv.StartAgain(t)
	waitFor(t, sink, "after the outage", expectCounts(want))
}

// receiverConnections counts the receiver's sessions in pg_stat_activity.
func receiverConnections(t *testing.T, srv *pgtest.Server) int {
	t.Helper()
	var n int
	require.NoError(t, srv.Conn(t, "").QueryRow(t.Context(),
		"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'otelcol-pgconsistency%'").Scan(&n))
	return n
}

// TestIntegrationCrashAndRecovery: the server is killed (pg_ctl stop -m
// immediate, as in a crash) while the receiver runs, and started again: up
// goes 0 then 1, and the receiver holds as many connections after as before.
func TestIntegrationCrashAndRecovery(t *testing.T) {
	t.Parallel()
	srv, sink, want := receiverOnBrokenHeads(t)
	waitFor(t, sink, "before the crash", expectCounts(want))
	before := receiverConnections(t, srv)
	require.GreaterOrEqual(t, before, 1)
	require.LessOrEqual(t, before, 2, "the scrape pool holds at most 2 connections")

	for round := 1; round <= 3; round++ {
		srv.StopImmediate(t)
		waitFor(t, sink, "during the crash", expectDown)
		srv.StartAgain(t)
		waitFor(t, sink, "after the crash", expectCounts(want))
		time.Sleep(time.Second) // a few more scrapes
		after := receiverConnections(t, srv)
		assert.LessOrEqual(t, after, before, "round %d: no connection leak (%d before, %d after)", round, before, after)
	}
}

// TestIntegrationStartsWithDatabaseDown: Start succeeds with nothing listening;
// metrics appear once the database is there.
func TestIntegrationStartsWithDatabaseDown(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	srv.Stop(t)

	sink, _ := startReceiver(t, srv, db)
	waitFor(t, sink, "database down at start", expectDown)
	srv.StartAgain(t)
	snap := waitFor(t, sink, "database up", expectCounts(map[string]int{}))
	ts, _ := snap.get("pgconsistency.snapshot.timestamp", "dataset_seed_missing")
	assert.Zero(t, ts, "never refreshed: timestamp 0, so staleness alerts fire")
}

// TestIntegrationSchemaNotInstalled: a database without pgconsistency gives
// up = 0 and an error that says how to install it.
func TestIntegrationSchemaNotInstalled(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := srv.CreateDatabase(t, "")
	cfg := serverConfig(srv, db)
	c, err := newPgxClient(t.Context(), cfg)
	require.NoError(t, err)
	defer c.close()
	_, err = c.status(t.Context())
	require.ErrorContains(t, err, `relation "pgconsistency.status" does not exist`)
	require.ErrorContains(t, err, "sql/install.sql")

	// A schema that tries SQL injection is quoted as an identifier: the query
	// fails as "does not exist", and nothing of it runs.
	injected := serverConfig(srv, db)
	injected.Schema = `pgconsistency"; CREATE TABLE public.injected (x int); --`
	c3, err := newPgxClient(t.Context(), injected)
	require.NoError(t, err)
	defer c3.close()
	_, err = c3.status(t.Context())
	require.ErrorContains(t, err, "does not exist")
	var injectedTables int
	require.NoError(t, srv.Conn(t, db).QueryRow(t.Context(), "SELECT count(*) FROM pg_class WHERE relname = 'injected'").Scan(&injectedTables))
	require.Zero(t, injectedTables)

	cfg.Password = "wrong"
	c2, err := newPgxClient(t.Context(), cfg)
	require.NoError(t, err)
	defer c2.close()
	_, err = c2.status(t.Context())
	require.ErrorContains(t, err, "password authentication failed")
}

// TestIntegrationStatusBlockedByALock: with the state table locked by another
// session, scrapes end within their timeout and report up = 0; once the lock
// is released the next scrape succeeds.
func TestIntegrationStatusBlockedByALock(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_seed_missing")
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	sink, _ := startReceiver(t, srv, db)
	want := map[string]int{"dataset_seed_missing": 3}
	waitFor(t, sink, "before the lock", expectCounts(want))

	tx, err := srv.Conn(t, db).Begin(t.Context())
	require.NoError(t, err)
	_, err = tx.Exec(t.Context(), "LOCK TABLE pgconsistency.refresh_state IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)
	locked := len(sink.AllMetrics())
	snap := waitFor(t, sink, "while locked", func(s snapshot) error {
		if up, _ := s.get("pgconsistency.up", ""); up != 0 {
			return fmt.Errorf("pgconsistency.up = %v, want 0", up)
		}
		return nil
	})
	assert.Len(t, snap.values, 1, "only pgconsistency.up while the status cannot be read")
	time.Sleep(2 * time.Second)
	assert.GreaterOrEqual(t, len(sink.AllMetrics())-locked, 4, "scrapes keep ending (timeout 200 ms, interval 250 ms: about 8 in 2 s)")

	require.NoError(t, tx.Rollback(t.Context()))
	waitFor(t, sink, "after the lock", expectCounts(want))
}

// TestIntegrationScrapeTransactionLimits: the scrape's one-round-trip
// transaction is read only and under the scrape's statement_timeout, and a
// failed one leaves its pooled connection usable.
func TestIntegrationScrapeTransactionLimits(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	cfg := serverConfig(srv, db)
	cfg.Timeout = 300 * time.Millisecond
	c, err := newPgxClient(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(c.close)
	pc := c.(*pgxClient)

	// readStatus runs query as the scrape runs its own, on a connection of the pool.
	readStatus := func(query string) error {
		conn, err := pc.pool.Acquire(t.Context())
		require.NoError(t, err)
		defer conn.Release()
		_, _, err = pc.readStatusOn(t.Context(), conn, query)
		return err
	}
	err = readStatus("CREATE TABLE public.scrape_wrote (i int)")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	assert.Equal(t, "25006", pgErr.Code, "read_only_sql_transaction: %v", err)
	err = readStatus("SELECT pg_catalog.pg_sleep(2)")
	require.ErrorAs(t, err, &pgErr)
	assert.Equal(t, "57014", pgErr.Code, "the scrape's statement_timeout: %v", err)
	rows, err := pc.status(t.Context())
	require.NoError(t, err, "the pool still serves after two failed transactions")
	assert.Len(t, rows, len(fixture.Invariants))
	assert.EqualValues(t, 1, pc.pool.Stat().TotalConns(), "the connection was kept, not replaced")
}
