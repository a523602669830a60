package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// discoveryAppName is the application_name of discovery's connections in
// pg_stat_activity.
const discoveryAppName = "otelcol-pgconsistency-discovery"

// listDatabases is every database discovery considers: those that accept
// connections and are not templates.
const listDatabases = `SELECT datname FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname`

// hasStatusView says whether pgconsistency is installed in the database the
// connection is to.
const hasStatusView = `SELECT pg_catalog.to_regclass('` + schema + `.status') IS NOT NULL`

// discovery keeps the scraper's databases in step with the server: every
// discovery::interval it lists the databases (pg_database) over a connection
// to discovery::database, stops watching those that are gone or excluded,
// and connects to each new one to see whether pgconsistency is installed
// there, one at a time and briefly. It holds one connection at a time, and
// watches at most maxDiscoveredDatabases databases: the rest are logged,
// once, as refused.
type discovery struct {
	background
	cfg     *Config
	logger  *zap.Logger
	scraper *pgScraper

	// Used by the loop goroutine only: what was last logged, so that a
	// state that persists is logged once, not at every interval.
	lastListError string
	lastRefused   string
	probeErrors   map[string]string // database → the error last logged for it
}

func newDiscovery(cfg *Config, logger *zap.Logger, s *pgScraper) *discovery {
	return &discovery{cfg: cfg, logger: logger, scraper: s, probeErrors: map[string]string{}}
}

// start runs the loop until shutdown.
func (d *discovery) start() { d.launch(d.loop) }

func (d *discovery) loop(ctx context.Context) {
	ticker := time.NewTicker(d.cfg.Discovery.Interval)
	defer ticker.Stop()
	for {
		d.pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// pass lists the server's databases once and brings the watched set in
// line with it.
func (d *discovery) pass(ctx context.Context) {
	listed, err := d.list(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		if msg := err.Error(); msg != d.lastListError {
			d.lastListError = msg
			d.logger.Warn("pgconsistency discovery: cannot list the databases of the server; the databases watched are kept, "+
				"and the list is read again every discovery::interval", zap.Duration("interval", d.cfg.Discovery.Interval), zap.Error(err))
		}
		return
	}
	if d.lastListError != "" {
		d.lastListError = ""
		d.logger.Info("pgconsistency discovery: the databases of the server are listed again")
	}
	candidates := slices.DeleteFunc(listed, func(name string) bool { return slices.Contains(d.cfg.Discovery.Exclude, name) })

	// Gone from the server (dropped, or no longer accepting connections)
	// or excluded since: no longer watched.
	for _, name := range d.scraper.watching() {
		if !slices.Contains(candidates, name) && d.scraper.remove(name) {
			d.logger.Info("pgconsistency discovery: database no longer on the server (or no longer accepting connections); no longer watched",
				zap.String("database", name))
		}
	}
	for name := range d.probeErrors {
		if !slices.Contains(candidates, name) {
			delete(d.probeErrors, name)
		}
	}

	var refused []string
	for _, name := range candidates {
		watched := d.scraper.watching()
		if slices.Contains(watched, name) {
			continue
		}
		installed, err := d.probe(ctx, name)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if msg := err.Error(); msg != d.probeErrors[name] {
				d.probeErrors[name] = msg
				d.logger.Info("pgconsistency discovery: cannot connect to a database to see whether pgconsistency is installed there; "+
					"not watched (grant the receiver's role CONNECT on it, or add it to discovery::exclude)",
					zap.String("database", name), zap.Error(err))
			}
			continue
		}
		delete(d.probeErrors, name)
		if !installed {
			d.logger.Debug("pgconsistency discovery: no pgconsistency in database; not watched", zap.String("database", name))
			continue
		}
		if len(watched) >= d.cfg.maxDiscoveredDatabases() {
			refused = append(refused, name)
			continue
		}
		if err := d.scraper.add(ctx, name, true); err != nil {
			d.logger.Warn("pgconsistency discovery: cannot watch database", zap.String("database", name), zap.Error(err))
			continue
		}
		d.logger.Info("pgconsistency discovery: database with pgconsistency found; watched from now on", zap.String("database", name))
	}
	if r := strings.Join(refused, ","); r != d.lastRefused {
		d.lastRefused = r
		if r != "" {
			d.logger.Warn("pgconsistency discovery: databases with pgconsistency not watched: max_connections is reached; "+
				"raise max_connections (each database takes "+d.cfg.perDatabaseWhat()+
				", and discovery one), or add databases to discovery::exclude",
				zap.Strings("databases", refused), zap.Int("max_connections", d.cfg.MaxConnections),
				zap.Int("databases_watched", d.cfg.maxDiscoveredDatabases()))
		}
	}
}

// list reads the names of the databases discovery considers.
func (d *discovery) list(ctx context.Context) ([]string, error) {
	var names []string
	err := d.withConn(ctx, d.cfg.Discovery.Database, func(ctx context.Context, conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, listDatabases)
		if err != nil {
			return err
		}
		names, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err != nil {
		return nil, explainDiscoveryError(d.cfg.Discovery.Database, err)
	}
	return names, nil
}

// probe says whether pgconsistency is installed in database name.
func (d *discovery) probe(ctx context.Context, name string) (bool, error) {
	var installed bool
	err := d.withConn(ctx, name, func(ctx context.Context, conn *pgx.Conn) error {
		return conn.QueryRow(ctx, hasStatusView).Scan(&installed)
	})
	return installed, err
}

// withConn runs fn on a connection of its own to database db, in a
// read-only transaction under the receiver's timeout, and closes the
// connection: discovery keeps nothing open between its steps.
func (d *discovery) withConn(ctx context.Context, db string, fn func(context.Context, *pgx.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.effectiveTimeout())
	defer cancel()
	cc, err := connConfig(ctx, d.cfg.forDatabase(db))
	if err != nil {
		return err
	}
	cc.RuntimeParams["application_name"] = discoveryAppName
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		if advice := tlsAdvice(err); advice != "" {
			return errors.New(err.Error() + "; " + advice)
		}
		return err
	}
	defer func() {
		closeCtx, closeCancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer closeCancel()
		_ = conn.Close(closeCtx)
	}()
	return inTransaction(ctx, conn, true, d.cfg.effectiveTimeout(), func(tx pgx.Tx) error {
		return fn(ctx, tx.Conn())
	})
}

// explainDiscoveryError says what to do when the list of databases cannot
// be read.
func explainDiscoveryError(db string, err error) error {
	return errors.New(`reading the list of databases in database "` + db + `" ("discovery::database"): ` + err.Error() +
		`; is the server up, may the receiver's role connect to that database (set "discovery::database" to one it may), ` +
		`and are endpoint, username, password and tls right?`)
}
