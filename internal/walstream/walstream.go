// Package walstream reads the WAL capture's replication slot over a
// replication connection (START_REPLICATION) and stores the keys of the
// changes it receives in the database, for the receiver's
// refresh::wal_stream and the benchmarks.
//
// Why: a read of the slot by SQL (pgconsistency.capture_wal()) decodes the
// WAL again from the slot's restart_lsn at every read, and PostgreSQL moves
// restart_lsn only past a running-transactions record, about every 15
// seconds: under a write load each read decodes again what the reads before
// it decoded. A replication connection keeps one decoding session open and
// decodes each record once, as it is written.
//
// How nothing is lost: the changes received (wal2json format 2, one per
// message) are handed to pgconsistency.capture_wal_stream() on an ordinary
// connection, which evaluates their keys with the statement capture_wal()
// runs and stores them. Only once that transaction committed is the WAL
// position they reach confirmed to the slot: a stream that stops (a crash,
// a restart of either side) starts again from the confirmed position, and
// the server sends again whatever was not confirmed.
package walstream // import "github.com/pgconsistency/pgconsistency/internal/walstream"

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgproto3"
)

// Defaults of Options.
const (
	// DefaultFlushDelay is how long a change received waits for others
	// before the batch is stored: at most one store a second. A store
	// costs about 20 ms besides its changes (capture_wal_stream's
	// statement, 29 kB, parsed and planned again: a one-change store took
	// 21-26 ms against 1 ms for an empty one, on the 1M database of
	// BENCHMARKS.md); at 200 ms, the stores took 24% of a core beside two
	// pgbench clients.
	DefaultFlushDelay = time.Second
	// DefaultMaxPending is how many changes are held at most before they
	// are stored, inside a transaction too (its position is not confirmed
	// until its commit is).
	DefaultMaxPending = 10000
	// DefaultStatusInterval is how often, with nothing to store, the
	// position reached is stored and confirmed to the slot (so that it
	// keeps no more WAL than that) and the capture is checked (set back to
	// triggers, tables added).
	DefaultStatusInterval = 5 * time.Second
	// storeTimeout bounds one store.
	storeTimeout = 30 * time.Second
)

// Querier runs the two SQL functions: a *pgx.Conn, or a pool.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Options of a stream.
type Options struct {
	// Replication connects to the server itself (not a
	// transaction-pooling proxy), as a role with REPLICATION; Run sets
	// replication=database.
	Replication *pgconn.Config
	// Conn gives the ordinary connection the changes are stored on; after
	// an error of Run, the caller should close it.
	Conn func(context.Context) (Querier, error)
	// FlushDelay, MaxPending, StatusInterval: see the defaults; 0 takes
	// the default.
	FlushDelay     time.Duration
	MaxPending     int
	StatusInterval time.Duration
	// OnStore, when set, is called after each store (tests, benchmarks):
	// the changes stored and the position confirmed.
	OnStore func(changes int, position pglogrepl.LSN)
}

// NotReadyError is returned when the stream cannot start now, with the
// reason pgconsistency.wal_stream_start() gave (the trigger capture, a
// standby, the slot missing until the refresh loop creates it again).
type NotReadyError struct{ Problem string }

func (e *NotReadyError) Error() string { return "the WAL stream cannot start: " + e.Problem }

// ErrTablesChanged: the tables the capture decodes changed (an invariant
// entered or left incremental mode); start the stream again, at once.
var ErrTablesChanged = errors.New("the tables the WAL capture decodes changed: the stream starts again from the stored position")

// ErrCaptureChanged: the capture is no longer 'wal'.
var ErrCaptureChanged = errors.New("the capture is no longer wal: the stream ends")

// slotName is what a slot name may hold (PostgreSQL's rule), so that it
// can be written into START_REPLICATION as it is.
var slotName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// start is what pgconsistency.wal_stream_start() returns.
type start struct {
	slot     string
	position pglogrepl.LSN
	tables   string
}

// Run streams until ctx ends or an error: it always returns an error
// (ctx.Err() once ctx ends).
func Run(ctx context.Context, o Options) error {
	if o.FlushDelay <= 0 {
		o.FlushDelay = DefaultFlushDelay
	}
	if o.MaxPending <= 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.StatusInterval <= 0 {
		o.StatusInterval = DefaultStatusInterval
	}
	q, err := o.Conn(ctx)
	if err != nil {
		return err
	}
	st, err := begin(ctx, q)
	if err != nil {
		return err
	}
	if err := slotFree(ctx, q, st.slot); err != nil {
		return err
	}
	rc := o.Replication.Copy()
	if rc.RuntimeParams == nil {
		rc.RuntimeParams = map[string]string{}
	}
	rc.RuntimeParams["replication"] = "database"
	// A deadline ends a wait for messages (the loop's timer) without
	// cancelling the walsender's command.
	rc.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler { return &pgconn.DeadlineContextWatcherHandler{Conn: c.Conn()} }
	conn, err := pgconn.ConnectConfig(ctx, rc)
	if err != nil {
		return fmt.Errorf("the WAL stream's replication connection to %s:%d as %q: %w%s", rc.Host, rc.Port, rc.User, err, connectAdvice(err))
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
	}()
	if err := pglogrepl.StartReplication(ctx, conn, st.slot, st.position, pglogrepl.StartReplicationOptions{
		Mode: pglogrepl.LogicalReplication,
		// The options of pgconsistency._wal_slot_changes: the same JSON.
		PluginArgs: []string{`"format-version" '2'`, `"add-tables" ` + quote(st.tables), `"include-types" 'false'`},
	}); err != nil {
		return fmt.Errorf("START_REPLICATION of slot %s at %s: %w%s", st.slot, st.position, err, startAdvice(err))
	}
	s := &session{o: o, q: q, conn: conn, tables: st.tables, received: st.position, stored: st.position}
	return s.loop(ctx)
}

// begin asks where to start.
func begin(ctx context.Context, q Querier) (start, error) {
	var slot, position, tables, problem *string
	if err := q.QueryRow(ctx, `SELECT slot_name, start_position::text, tables, problem FROM pgconsistency.wal_stream_start()`).
		Scan(&slot, &position, &tables, &problem); err != nil {
		return start{}, fmt.Errorf("pgconsistency.wal_stream_start(): %w", err)
	}
	if problem != nil {
		return start{}, &NotReadyError{Problem: *problem}
	}
	if slot == nil || tables == nil || !slotName.MatchString(*slot) {
		name := "none"
		if slot != nil {
			name = strconv.Quote(*slot)
		}
		return start{}, fmt.Errorf("pgconsistency.wal_stream_start() gave no usable slot name (%s): set pgconsistency.capture.slot_name to letters, digits and _", name)
	}
	st := start{slot: *slot, tables: *tables}
	if position != nil {
		lsn, err := pglogrepl.ParseLSN(*position)
		if err != nil {
			return start{}, err
		}
		st.position = lsn
	}
	return st, nil
}

// slotFreeWait bounds how long Run waits for the walsender of a stream that
// just ended (its own previous one: the tables changed) to let the slot go.
const slotFreeWait = 10 * time.Second

// slotFree waits until no session holds the slot, at most slotFreeWait;
// then START_REPLICATION says who does.
func slotFree(ctx context.Context, q Querier, slot string) error {
	deadline := time.Now().Add(slotFreeWait)
	for {
		var active bool
		if err := q.QueryRow(ctx, `SELECT coalesce((SELECT s.active FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1), false)`, slot).
			Scan(&active); err != nil {
			return fmt.Errorf("looking up the slot %s: %w", slot, err)
		}
		if !active || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// session is one replication connection's stream.
type session struct {
	o      Options
	q      Querier
	conn   *pgconn.PgConn
	tables string

	pending      []string  // changes received, not stored
	pendingSince time.Time // when the first of them arrived
	inTxn        bool      // between a transaction's B and C
	received     pglogrepl.LSN
	stored       pglogrepl.LSN // stored by capture_wal_stream, confirmed to the slot
	lastStore    time.Time
}

func (s *session) loop(ctx context.Context) error {
	s.lastStore = time.Now()
	for {
		deadline := s.lastStore.Add(s.o.StatusInterval)
		if len(s.pending) > 0 {
			deadline = s.pendingSince.Add(s.o.FlushDelay)
		}
		replyNow := false
		rctx, cancel := context.WithDeadline(ctx, deadline)
		msg, err := s.conn.ReceiveMessage(rctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil && !pgconn.Timeout(err):
			return fmt.Errorf("the WAL stream: %w", err)
		case err == nil:
			switch m := msg.(type) {
			case *pgproto3.CopyData:
				if replyNow, err = s.receive(m.Data); err != nil {
					return err
				}
			case *pgproto3.ErrorResponse:
				return fmt.Errorf("the WAL stream: %w", pgconn.ErrorResponseToPgError(m))
			default:
				return fmt.Errorf("the WAL stream: unexpected message %T", msg)
			}
		}
		now := time.Now()
		if len(s.pending) >= s.o.MaxPending || (len(s.pending) > 0 && now.Sub(s.pendingSince) >= s.o.FlushDelay) ||
			now.Sub(s.lastStore) >= s.o.StatusInterval {
			if err := s.store(ctx); err != nil {
				return err
			}
			replyNow = true
		}
		if replyNow {
			if err := s.confirm(ctx); err != nil {
				return err
			}
		}
	}
}

// receive takes one message of the stream; it says whether the server asked
// for a reply.
func (s *session) receive(data []byte) (bool, error) {
	if len(data) == 0 {
		return false, nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return false, err
		}
		// Every transaction committed before ServerWALEnd was sent before
		// this message; one in progress is sent whole at its commit.
		if !s.inTxn && ka.ServerWALEnd > s.received {
			s.received = ka.ServerWALEnd
		}
		return ka.ReplyRequested, nil
	case pglogrepl.XLogDataByteID:
		x, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return false, err
		}
		switch action(x.WALData) {
		case "B":
			s.inTxn = true
		case "C":
			// WALStart of a commit is the end of its record.
			s.inTxn = false
			if x.WALStart > s.received {
				s.received = x.WALStart
			}
		case "I", "U", "D", "T":
			if len(s.pending) == 0 {
				s.pendingSince = time.Now()
			}
			s.pending = append(s.pending, string(x.WALData))
		}
	}
	return false, nil
}

// store hands the changes received to capture_wal_stream; once it
// returned (committed), every change before the position received is
// stored.
func (s *session) store(ctx context.Context) error {
	reached := s.received
	sctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	var stored *int64
	if err := s.q.QueryRow(sctx, `SELECT pgconsistency.capture_wal_stream($1::text[], $2)`, s.pending, s.tables).
		Scan(&stored); err != nil {
		return fmt.Errorf("storing %d changes of the WAL stream: %w", len(s.pending), err)
	}
	switch {
	case stored == nil:
		return ErrCaptureChanged
	case *stored < 0:
		return ErrTablesChanged
	}
	n := len(s.pending)
	s.pending = s.pending[:0]
	if reached > s.stored {
		s.stored = reached
	}
	s.lastStore = time.Now()
	if s.o.OnStore != nil {
		s.o.OnStore(n, s.stored)
	}
	return nil
}

// confirm tells the server the position stored: the slot keeps the WAL
// after it only.
func (s *session) confirm(ctx context.Context) error {
	if err := pglogrepl.SendStandbyStatusUpdate(ctx, s.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: s.stored, WALFlushPosition: s.stored, WALApplyPosition: s.stored,
	}); err != nil {
		return fmt.Errorf("confirming %s to the WAL stream: %w", s.stored, err)
	}
	return nil
}

// action is a wal2json format-2 change's "action" (its first member); ""
// when it has none.
func action(change []byte) string {
	d := json.NewDecoder(bytes.NewReader(change))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return ""
	}
	for d.More() {
		k, err := d.Token()
		if err != nil {
			return ""
		}
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return ""
		}
		if k == "action" {
			var a string
			if json.Unmarshal(v, &a) != nil {
				return ""
			}
			return a
		}
	}
	return ""
}

// quote writes s as a string literal of the replication protocol.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// connectAdvice says how to fix a replication connection that failed.
func connectAdvice(err error) string {
	var pgErr *pgconn.PgError
	msg := err.Error()
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "42501", strings.Contains(msg, "must be superuser or replication role"),
		strings.Contains(msg, "permission denied to start WAL sender"):
		return "; the stream's role needs REPLICATION: ALTER ROLE <role> REPLICATION (on Amazon RDS/Aurora: GRANT rds_replication TO <role>), " +
			"or set refresh::wal_stream::username to a role that has it"
	case strings.Contains(msg, "unsupported startup parameter"):
		return "; a replication connection cannot pass a transaction-pooling proxy such as PgBouncer: point refresh::wal_stream::endpoint at the PostgreSQL server itself"
	case strings.Contains(msg, "no pg_hba.conf entry"):
		return "; add a pg_hba.conf line for the stream's role to this database (a logical replication connection matches the database's lines, not \"replication\"), then SELECT pg_reload_conf()"
	}
	return ""
}

// startAdvice says how to fix a START_REPLICATION that failed.
func startAdvice(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55006" {
		return "; another session reads the slot (a second collector streaming this database?): it is tried again"
	}
	return ""
}
