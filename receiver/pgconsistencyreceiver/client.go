package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// invariantStatus is one row of pgconsistency.status, as the receiver reads it.
type invariantStatus struct {
	Invariant             string     `db:"invariant"`
	Severity              string     `db:"severity"`
	Anomalies             int64      `db:"anomalies"`
	NewAnomalies          int64      `db:"new_anomalies"`
	ResolvedAnomalies     int64      `db:"resolved_anomalies"`
	AcknowledgedAnomalies int64      `db:"acknowledged_anomalies"`
	RefreshedAt           *time.Time `db:"refreshed_at"`
	LastDurationSeconds   *float64   `db:"last_duration_seconds"`
	ConsecutiveFailures   int64      `db:"consecutive_failures"`
	LastOutcome           string     `db:"last_outcome"`
	RefreshPeriod         float64    `db:"refresh_period_seconds"`
	// database-wide values, the same on every row
	PendingRequests       int64      `db:"pending_requests"`
	DeployMarkerChangedAt *time.Time `db:"deploy_marker_changed_at"`
	// DeployMarker is the deploy marker's value (0.6.0 and later; "" before,
	// or when it has none).
	DeployMarker string `db:"deploy_marker"`
	// Version is the installed SQL version; "" when the view has no version
	// column (release 0.1.0).
	Version string `db:"version"`
	// RefreshMode is full or incremental (0.3.0 and later; full before,
	// where every refresh is a full one).
	RefreshMode string `db:"refresh_mode"`
	// HealedAnomalies is what the latest reconcile found the incremental
	// refreshes had missed (0.3.0 and later; 0 before).
	HealedAnomalies int64 `db:"healed_anomalies"`
	// Owner and RunbookURL are the invariant's (0.5.0 and later); "" when
	// unset, and with older SQL.
	Owner      string `db:"owner"`
	RunbookURL string `db:"runbook_url"`
	// Where the latest refresh's new anomalies came from (0.6.0 and later;
	// empty before, and when it found none): the deployment they appeared
	// after, when a deploy came after the previous clean refresh
	// (NewDeployedAt nil otherwise), and the latest change recorded as their
	// cause by the audit pack (NewCauseChangedAt nil when none is).
	NewDeployMarker         string     `db:"new_deploy_marker"`
	NewDeployedAt           *time.Time `db:"new_deployed_at"`
	NewCauseChangedAt       *time.Time `db:"new_cause_changed_at"`
	NewCauseOperation       string     `db:"new_cause_operation"`
	NewCauseTable           string     `db:"new_cause_table"`
	NewCauseDBUser          string     `db:"new_cause_db_user"`
	NewCauseApplicationName string     `db:"new_cause_application_name"`
	// The capture (0.7.0 and later). Capture is how the invariant's writes
	// are captured, trigger or wal, "" in full mode. The rest is the same
	// on every row: the WAL capture's slot, CaptureSlotStatus "" unless the
	// database uses the WAL capture, the byte counts nil when unknown (a
	// standby; no slot; the bound nil when unbounded). CaptureReported is
	// false with older SQL, which has no capture to report.
	Capture                 string `db:"capture"`
	CaptureSlotStatus       string `db:"capture_slot_status"`
	CaptureWALRetainedBytes *int64 `db:"capture_wal_retained_bytes"`
	CaptureWALLagBytes      *int64 `db:"capture_wal_lag_bytes"`
	CaptureWALBoundBytes    *int64 `db:"capture_wal_bound_bytes"`
	CaptureReported         bool   `db:"capture_reported"`
}

// client is what the scraper needs from the database; tests use a fake.
type client interface {
	// status returns one row per enabled invariant.
	status(ctx context.Context) ([]invariantStatus, error)
	close()
}

type clientFactory func(ctx context.Context, cfg *Config) (client, error)

// statusColumns are named, not *, so that new columns in the view never
// break an older receiver.
const statusColumns = `invariant, severity, anomalies, new_anomalies, resolved_anomalies, acknowledged_anomalies, refreshed_at,
	last_duration_seconds, consecutive_failures, last_outcome, refresh_period_seconds, pending_requests,
	deploy_marker_changed_at`

// schema is where sql/install.sql puts every object; the receiver's
// "schema" setting can name no other (see Config.Schema).
const schema = "pgconsistency"

// statusShape is which release's status view a query reads. Each release
// adds columns; a collector upgraded before the database reads the newest
// shape the database has, and reports what an older release cannot tell as
// the older release behaves: no version (0.1.0), every refresh full and
// nothing healed (before 0.3.0), no owner nor runbook (before 0.5.0), no
// deploy marker value (before 0.6.0), no capture (before 0.7.0).
type statusShape int32

const (
	shape070 statusShape = iota // capture, capture_slot_status, capture_wal_*
	shape060                    // deploy_marker, new_deploy_marker, new_cause_*
	shape050                    // owner, runbook_url
	shape030                    // refresh_mode, healed_anomalies
	shape020                    // version
	shape010                    // the first release
	shapeCount

	shapeNewest = shape070
)

// statusQueries are indexed by statusShape, newest first.
var statusQueries = [shapeCount]string{
	shape070: "SELECT " + statusColumns + ", version, refresh_mode, healed_anomalies, " +
		"coalesce(owner, '') AS owner, coalesce(runbook_url, '') AS runbook_url, coalesce(deploy_marker, '') AS deploy_marker, " +
		newOriginColumns + ", " + captureColumns + " FROM " + schema + ".status WHERE enabled",
	shape060: "SELECT " + statusColumns + ", version, refresh_mode, healed_anomalies, " +
		"coalesce(owner, '') AS owner, coalesce(runbook_url, '') AS runbook_url, coalesce(deploy_marker, '') AS deploy_marker, " +
		newOriginColumns + noCapture + " FROM " + schema + ".status WHERE enabled",
	shape050: "SELECT " + statusColumns + ", version, refresh_mode, healed_anomalies, " +
		"coalesce(owner, '') AS owner, coalesce(runbook_url, '') AS runbook_url" + noDeployMarker + noNewOrigin + noCapture + " FROM " + schema + ".status WHERE enabled",
	shape030: "SELECT " + statusColumns + ", version, refresh_mode, healed_anomalies" + noOwner + noDeployMarker + noNewOrigin + noCapture + " FROM " + schema + ".status WHERE enabled",
	shape020: "SELECT " + statusColumns + ", version, 'full' AS refresh_mode, 0::bigint AS healed_anomalies" + noOwner + noDeployMarker + noNewOrigin + noCapture + " FROM " +
		schema + ".status WHERE enabled",
	shape010: "SELECT " + statusColumns + ", '' AS version, 'full' AS refresh_mode, 0::bigint AS healed_anomalies" +
		noOwner + noDeployMarker + noNewOrigin + noCapture + " FROM " + schema + ".status WHERE enabled",
}

// noOwner stands for the owner and runbook_url of SQL older than 0.5.0.
const noOwner = ", '' AS owner, '' AS runbook_url"

// noDeployMarker stands for the deploy marker value of SQL older than 0.6.0.
const noDeployMarker = ", '' AS deploy_marker"

// newOriginColumns are where the latest refresh's new anomalies came from
// (0.6.0): the deployment only when it came after the previous clean
// refresh, the cause only when one is recorded.
const newOriginColumns = `coalesce(new_deploy_marker, '') AS new_deploy_marker,
	CASE WHEN new_deployed_since_previous_refresh THEN new_deployed_at END AS new_deployed_at,
	new_cause_changed_at, coalesce(new_cause_operation, '') AS new_cause_operation,
	coalesce(new_cause_table, '') AS new_cause_table, coalesce(new_cause_db_user, '') AS new_cause_db_user,
	coalesce(new_cause_application_name, '') AS new_cause_application_name`

// noNewOrigin stands for them with SQL older than 0.6.0: none known.
const noNewOrigin = `, '' AS new_deploy_marker, NULL::timestamptz AS new_deployed_at, NULL::timestamptz AS new_cause_changed_at,
	'' AS new_cause_operation, '' AS new_cause_table, '' AS new_cause_db_user, '' AS new_cause_application_name`

// captureColumns are the capture of each invariant and the WAL capture's
// slot (0.7.0).
const captureColumns = `coalesce(capture, '') AS capture, coalesce(capture_slot_status, '') AS capture_slot_status,
	capture_wal_retained_bytes, capture_wal_lag_bytes, capture_wal_bound_bytes, true AS capture_reported`

// noCapture stands for them with SQL older than 0.7.0: no capture to report.
const noCapture = `, '' AS capture, '' AS capture_slot_status, NULL::bigint AS capture_wal_retained_bytes,
	NULL::bigint AS capture_wal_lag_bytes, NULL::bigint AS capture_wal_bound_bytes, false AS capture_reported`

// viewMarkerQuery reads what changes whenever install.sql re-creates the
// status view (and so whenever its columns can change): the transaction id
// that wrote its rewrite rule. The status query that follows it in the same
// transaction sees that view or a newer one, never an older one.
const viewMarkerQuery = "SELECT coalesce((SELECT r.xmin::text FROM pg_catalog.pg_rewrite r " +
	"WHERE r.ev_class = pg_catalog.to_regclass('" + schema + ".status') AND r.rulename = '_RETURN'), '')"

type pgxClient struct {
	pool    *pgxpool.Pool
	timeout time.Duration
	target  string // for error messages: database@host:port

	// The status shape that last worked in this database, and the view
	// marker (viewMarkerQuery) read before it was chosen, so that a scrape
	// runs no query known to fail. The shape goes back to the newest when
	// the pool opens a connection (after a restart or a failover, and when
	// pgxpool renews a connection, hourly by default) and when the marker
	// changes (install.sql re-created the view); it steps down on
	// undefined_column (an older release).
	mu          sync.Mutex
	shape       statusShape
	shapeMarker string

	// steppedDown, when set (tests only), runs after an attempt failed on
	// undefined_column and before the next older shape is tried.
	steppedDown func()
}

// inTransaction runs fn in a transaction that carries its own limits:
// statement_timeout set for this transaction only (set_config(..., true),
// i.e. SET LOCAL), and read only when asked. Behind a transaction-pooling
// proxy (PgBouncer, most managed proxies) startup parameters are refused and
// session settings do not follow the client from one transaction to the
// next; what is set inside a transaction does.
func inTransaction(ctx context.Context, db beginner, readOnly bool, timeout time.Duration, fn func(pgx.Tx) error) error {
	opts := pgx.TxOptions{}
	if readOnly {
		opts.AccessMode = pgx.ReadOnly
	}
	return pgx.BeginTxFunc(ctx, db, opts, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.set_config('statement_timeout', $1, true)",
			strconv.FormatInt(timeout.Milliseconds(), 10)); err != nil {
			return err
		}
		return fn(tx)
	})
}

// beginner is a pool or a connection.
type beginner interface {
	BeginTx(ctx context.Context, txOptions pgx.TxOptions) (pgx.Tx, error)
}

// connConfig is how the receiver connects: credentials set field by field
// (never through a connection string), TLS as configured, no fallback.
func connConfig(ctx context.Context, cfg *Config) (*pgx.ConnConfig, error) {
	host, port, err := cfg.hostPort()
	if err != nil {
		return nil, err
	}
	cc, err := pgx.ParseConfig("")
	if err != nil {
		return nil, fmt.Errorf("building the PostgreSQL connection configuration: %w", err)
	}
	cc.Host = host
	cc.Port = port
	cc.User = cfg.Username
	cc.Password = string(cfg.Password)
	cc.Database = cfg.Database
	cc.Fallbacks = nil // no silent downgrade from TLS to plain text
	cc.TLSConfig, err = cfg.TLS.LoadTLSConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf(`loading "tls" settings: %w`, err)
	}
	if cc.TLSConfig != nil && cc.TLSConfig.ServerName == "" {
		cc.TLSConfig.ServerName = host
	}
	// application_name is the only startup parameter: poolers refuse others.
	cc.RuntimeParams = map[string]string{"application_name": "otelcol-pgconsistency"}
	cc.ConnectTimeout = cfg.effectiveTimeout()
	// No named prepared statements (a pooler may run each transaction on
	// another server connection, where they do not exist) and no statement
	// descriptions fetched in a round trip of their own: each query is one
	// Parse/Bind/Execute/Sync with the unnamed statement.
	cc.DefaultQueryExecMode = pgx.QueryExecModeExec
	cc.StatementCacheCapacity = 0
	cc.DescriptionCacheCapacity = 0
	return cc, nil
}

// newPgxClient creates a connection pool; it does not connect, so the
// collector starts even when the database is down.
func newPgxClient(ctx context.Context, cfg *Config) (client, error) {
	cc, err := connConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pc, err := pgxpool.ParseConfig("")
	if err != nil {
		return nil, fmt.Errorf("building the PostgreSQL connection configuration: %w", err)
	}
	pc.ConnConfig = cc
	// One query per scrape: one connection is enough; a second covers a
	// connection being replaced while a scrape runs. Watching several
	// databases, each has one, within the bound of max_connections.
	pc.MaxConns = 2
	if cfg.multiDatabase() {
		pc.MaxConns = 1
	}
	pc.MinConns = 0

	c := &pgxClient{
		timeout: cfg.effectiveTimeout(),
		target:  fmt.Sprintf("database %q at %s", cfg.Database, cfg.Endpoint),
	}
	// A new connection may be to another server (a failover) or to an
	// upgraded database: probe from the newest shape again.
	pc.AfterConnect = func(context.Context, *pgx.Conn) error {
		c.setShape(shapeNewest, "")
		return nil
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("creating the PostgreSQL connection pool: %w", err)
	}
	c.pool = pool
	return c, nil
}

func (c *pgxClient) status(ctx context.Context) ([]invariantStatus, error) {
	rows, err := c.queryStatus(ctx)
	// A connection broken by a server restart fails on first use; the pool
	// then drops it. Retrying once, when nothing reached the server, keeps a
	// restart that is already over from showing up as a failed scrape. So
	// does a connection the server ended while it was idle (admin_shutdown:
	// pg_terminate_backend, DROP DATABASE … WITH (FORCE), a fast shutdown):
	// the read is read-only, and a new connection says what is true now.
	if err != nil && (pgconn.SafeToRetry(err) || isAdminShutdown(err)) && ctx.Err() == nil {
		rows, err = c.queryStatus(ctx)
	}
	if err != nil {
		return nil, c.explain(err)
	}
	return rows, nil
}

// isAdminShutdown is true when the server ended the connection (SQLSTATE
// 57P01).
func isAdminShutdown(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "57P01"
}

// queryStatus reads the status in a read-only transaction under the
// scrape's statement_timeout: the scrape can never write, nor hold the
// database longer than its timeout. It reads the shape that last worked;
// on undefined_column it steps down to the next older shape in the same
// scrape, and remembers the one that worked with the view marker read by
// the first attempt. Each attempt is a transaction of its own, so
// install.sql may upgrade the view between two of them: the shape found is
// then older than the view, and the marker, older too, makes the next
// scrape probe again.
func (c *pgxClient) queryStatus(ctx context.Context) ([]invariantStatus, error) {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Release()
	// Read after Acquire: a connection opened by it has reset the shape.
	c.mu.Lock()
	remembered, rememberedMarker := c.shape, c.shapeMarker
	c.mu.Unlock()
	firstMarker := ""
	for shape := remembered; ; shape++ {
		rows, marker, err := c.readStatusOn(ctx, conn, statusQueries[shape])
		if shape == remembered {
			firstMarker = marker
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42703" { // undefined_column
			if shape+1 < shapeCount {
				if c.steppedDown != nil {
					c.steppedDown()
				}
				continue // an older release
			}
			// Not even the columns of the first release, which every
			// release has: a broken view, which this error names. Probe
			// from the newest again next time.
			c.setShape(shapeNewest, "")
		}
		if err != nil {
			return nil, err
		}
		if shape == remembered && shape != shapeNewest && marker != rememberedMarker {
			// The view was re-created since this older shape was chosen:
			// the SQL was upgraded. Try the newest next time.
			c.setShape(shapeNewest, "")
		} else {
			c.setShape(shape, firstMarker)
		}
		return rows, nil
	}
}

func (c *pgxClient) setShape(shape statusShape, marker string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.shape, c.shapeMarker = shape, marker
}

// readStatusOn sends the whole transaction in one round trip: BEGIN READ
// ONLY, its statement_timeout, the view marker, the query, COMMIT (as
// inTransaction does, which would take five). A failed transaction is
// rolled back so that the connection can be used again. The marker is read
// even when the query fails.
func (c *pgxClient) readStatusOn(ctx context.Context, conn *pgxpool.Conn, query string) ([]invariantStatus, string, error) {
	var out []invariantStatus
	var marker string
	b := &pgx.Batch{}
	b.Queue("BEGIN READ ONLY")
	b.Queue("SELECT pg_catalog.set_config('statement_timeout', $1, true)", strconv.FormatInt(c.timeout.Milliseconds(), 10))
	b.Queue(viewMarkerQuery).QueryRow(func(row pgx.Row) error { return row.Scan(&marker) })
	b.Queue(query).Query(func(rows pgx.Rows) error {
		var err error
		out, err = pgx.CollectRows(rows, pgx.RowToStructByName[invariantStatus])
		return err
	})
	b.Queue("COMMIT")
	if err := conn.SendBatch(ctx, b).Close(); err != nil {
		if conn.Conn().PgConn().TxStatus() != 'I' {
			_, _ = conn.Exec(ctx, "ROLLBACK") // if this fails too, the pool drops the connection
		}
		return nil, marker, err
	}
	return out, marker, nil
}

// explain turns the errors users will meet into messages that say what to do.
func (c *pgxClient) explain(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "42P01", "3F000": // undefined_table, invalid_schema_name
			return fmt.Errorf("reading pgconsistency status in %s: %w; install it with "+
				"`psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`", c.target, err)
		case "3D000": // invalid_catalog_name
			return fmt.Errorf("reading pgconsistency status in %s: %w; create the database and install pgconsistency in it "+
				"(`psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`), or remove it from \"database\"/\"databases\"", c.target, err)
		case "42501": // insufficient_privilege
			return fmt.Errorf("reading pgconsistency status in %s: %w; grant the receiver's role "+
				"USAGE on the schema and SELECT on its status view", c.target, err)
		}
		return fmt.Errorf("reading pgconsistency status in %s: %w", c.target, err)
	}
	if advice := tlsAdvice(err); advice != "" {
		return fmt.Errorf("cannot read pgconsistency status from %s: %s: %w", c.target, advice, err)
	}
	return fmt.Errorf("cannot read pgconsistency status from %s (is the server up and reachable, and "+
		"are endpoint, username, password and tls right?): %w", c.target, err)
}

// tlsAdvice says which "tls" setting to change when err is a TLS mismatch
// between the receiver and the server, and "" otherwise.
func tlsAdvice(err error) string {
	var unknownCA x509.UnknownAuthorityError
	var wrongHost x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknownCA):
		return `the server's certificate is signed by an unknown authority (not the CA of "tls::ca_file", nor, without it, ` +
			`one of the system's trust store): set "tls::ca_file" to the certificate of the CA that issued it; managed services publish theirs (Amazon RDS and ` +
			`Aurora: global-bundle.pem of truststore.pki.rds.amazonaws.com; Cloud SQL: the instance's server-ca.pem; ` +
			`Azure Database for PostgreSQL: DigiCert Global Root G2 and Microsoft RSA Root Certificate Authority 2017). ` +
			`"tls::insecure_skip_verify: true" encrypts without verifying the server`
	case errors.As(err, &wrongHost):
		return fmt.Sprintf(`the server's certificate is not valid for host %q: it names %s; use one of those as the `+
			`host of "endpoint", or set "tls::server_name_override" to one of them`, wrongHost.Host, certificateNames(wrongHost.Certificate))
	case errors.As(err, &invalid):
		return `the server's certificate is not valid (expired, not yet valid, or not a server certificate): ` +
			`renew it on the server (or set "tls::insecure_skip_verify: true" to encrypt without verifying)`
	case strings.Contains(err.Error(), "server refused TLS connection"): // pgconn has no error value for it
		return `the server does not support TLS (ssl = off): set "tls::insecure: true" to connect over plain TCP, ` +
			`or turn ssl on in the server`
	}
	return ""
}

// certificateNames lists the host names and addresses a certificate is
// valid for, quoted, for an error message.
func certificateNames(cert *x509.Certificate) string {
	if cert == nil {
		return "no name"
	}
	var names []string
	for _, n := range cert.DNSNames {
		names = append(names, strconv.Quote(n))
	}
	for _, ip := range cert.IPAddresses {
		names = append(names, strconv.Quote(ip.String()))
	}
	if len(names) == 0 && cert.Subject.CommonName != "" {
		names = append(names, strconv.Quote(cert.Subject.CommonName)+" (its common name only, which Go no longer matches)")
	}
	if len(names) == 0 {
		return "no name"
	}
	return strings.Join(names, ", ")
}

func (c *pgxClient) close() {
	c.pool.Close()
}

// dedicatedConn is a connection of its own, for work that must not share the
// scrape pool (refreshes, the log cursor). After an error, close it: the
// next get connects again.
type dedicatedConn struct {
	cfg      *Config
	appName  string               // application_name in pg_stat_activity
	onNotice pgconn.NoticeHandler // nil: notices are dropped
	conn     *pgx.Conn
}

func (d *dedicatedConn) get(ctx context.Context) (*pgx.Conn, error) {
	if d.conn != nil && !d.conn.IsClosed() {
		return d.conn, nil
	}
	cc, err := connConfig(ctx, d.cfg)
	if err != nil {
		return nil, err
	}
	cc.RuntimeParams["application_name"] = d.appName
	cc.OnNotice = d.onNotice
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		if advice := tlsAdvice(err); advice != "" {
			return nil, fmt.Errorf("connecting to database %q at %s: %w; %s", d.cfg.Database, d.cfg.Endpoint, err, advice)
		}
		return nil, fmt.Errorf("connecting to database %q at %s: %w", d.cfg.Database, d.cfg.Endpoint, err)
	}
	d.conn = conn
	return conn, nil
}

func (d *dedicatedConn) close() {
	if d.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = d.conn.Close(ctx)
		d.conn = nil
	}
}
