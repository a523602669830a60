package pgconsistencyreceiver

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/config/confignet"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/confmaptest"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/receiver/receivertest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

func loadConfig(t *testing.T, name string) *Config {
	t.Helper()
	cm, err := confmaptest.LoadConf(filepath.Join("testdata", "config.yaml"))
	require.NoError(t, err)
	cfg := NewFactory().CreateDefaultConfig()
	sub, err := cm.Sub(component.NewIDWithName(metadata.Type, name).String())
	require.NoError(t, err)
	require.NoError(t, sub.Unmarshal(cfg))
	return cfg.(*Config)
}

func TestDefaultConfig(t *testing.T) {
	cfg := createDefaultConfig()
	assert.Equal(t, "localhost:5432", cfg.Endpoint)
	assert.Equal(t, confignet.TransportTypeTCP, cfg.Transport)
	assert.Empty(t, cfg.Schema, "schema is deprecated: unset by default")
	assert.Empty(t, cfg.deprecations())
	assert.Equal(t, 60*time.Second, cfg.CollectionInterval)
	assert.Zero(t, cfg.Timeout, "timeout is derived from collection_interval unless set")
	assert.Equal(t, 10*time.Second, cfg.effectiveTimeout())
	assert.Empty(t, cfg.PasswordFile)
	assert.False(t, cfg.TLS.Insecure, "TLS is on by default")
	assert.False(t, cfg.TLS.InsecureSkipVerify, "the server verified by default, like sslmode=verify-full (0.7.0)")
	// username and database have no sane default: the default config must say so.
	err := confmap.Validate(cfg)
	require.Error(t, err)
	assert.ErrorContains(t, err, `"username" must be set`)
	assert.ErrorContains(t, err, `"database" must be set`)
}

func TestLoadConfig(t *testing.T) {
	t.Run("minimal", func(t *testing.T) {
		cfg := loadConfig(t, "minimal")
		require.NoError(t, confmap.Validate(cfg))
		assert.Equal(t, "otel", cfg.Username)
		assert.Equal(t, "app", cfg.Database)
		assert.Equal(t, "localhost:5432", cfg.Endpoint)
		assert.Empty(t, cfg.Schema)
	})
	t.Run("all_settings", func(t *testing.T) {
		cfg := loadConfig(t, "all_settings")
		require.NoError(t, confmap.Validate(cfg))
		assert.Equal(t, "db.example.internal:6432", cfg.Endpoint)
		assert.Equal(t, "s3cret", string(cfg.Password))
		assert.Equal(t, "pgconsistency", cfg.Schema)
		assert.Equal(t, []string{`"schema" is deprecated and will be removed: pgconsistency is always in schema pgconsistency; remove the key`},
			cfg.deprecations(), "the old key still works, with a warning")
		assert.Equal(t, 5*time.Minute, cfg.CollectionInterval)
		assert.Equal(t, 20*time.Second, cfg.Timeout)
		assert.Equal(t, 20*time.Second, cfg.effectiveTimeout(), "an explicit timeout wins")
		assert.Equal(t, 2*time.Second, cfg.InitialDelay)
		assert.False(t, cfg.TLS.InsecureSkipVerify)
		assert.Equal(t, "/etc/ssl/certs/db-ca.pem", cfg.TLS.CAFile)
		assert.False(t, cfg.Metrics.PgconsistencyRefreshDuration.Enabled)
		assert.Equal(t, time.Minute, cfg.Refresh.PollInterval)
		assert.Equal(t, time.Minute, cfg.Refresh.interval())
		assert.Equal(t, 50, cfg.Logs.maxRecords())
		assert.Equal(t, "SELECT max(version) FROM public.schema_migrations", cfg.Refresh.DeployMarker.Query)
		assert.Equal(t, 15*time.Minute, cfg.Refresh.DeployMarker.Delay)
		assert.Equal(t, 2*time.Second, cfg.Refresh.ChangesInterval)
		assert.Equal(t, WALStreamConfig{Enabled: true, Endpoint: "db-primary.example.internal:5432", Username: "pgc_stream",
			Password: "r3plication", FlushDelay: 500 * time.Millisecond}, cfg.Refresh.WALStream)
		assert.Equal(t, 4, cfg.connectionsPerDatabase(), "scrape, scheduler, changes loop, the stream's keys")
		assert.True(t, cfg.Metrics.PgconsistencyAnomalies.Enabled)
		host, port, err := cfg.hostPort()
		require.NoError(t, err)
		assert.Equal(t, "db.example.internal", host)
		assert.Equal(t, uint16(6432), port)
	})
	t.Run("refresh settings", func(t *testing.T) {
		cfg := loadConfig(t, "minimal")
		assert.Zero(t, cfg.Refresh.PollInterval, "the scheduler is off by default: pg_cron or the DBA's cron refreshes")
		assert.Equal(t, 10*time.Minute, cfg.Refresh.DeployMarker.Delay)
		assert.Equal(t, time.Second, cfg.Refresh.ChangesInterval, "the changes loop is on by default, also without the scheduler")
		assert.Equal(t, 100, cfg.Logs.MaxRecordsPerInterval)
		assert.Equal(t, 100, cfg.Logs.maxRecords())
		err := confmap.Validate(loadConfig(t, "marker_without_schedule"))
		require.Error(t, err)
		for _, want := range []string{
			`"refresh::poll_interval" (-1m0s) must be positive`,
			`"refresh::deploy_marker::query" needs "refresh::poll_interval"`,
			`"refresh::deploy_marker::delay" (-5m0s) must be zero or more`,
			`"refresh::changes_interval" (-1s) must be positive, e.g. 1s, or 0`,
			`"logs::max_records_per_interval" (0) must be at least 1`,
		} {
			assert.ErrorContains(t, err, want)
		}
	})
	t.Run("wal_stream", func(t *testing.T) {
		assert.False(t, loadConfig(t, "minimal").Refresh.WALStream.Enabled, "off by default: its role needs REPLICATION")
		err := confmap.Validate(loadConfig(t, "wal_stream_wrong"))
		require.Error(t, err)
		for _, want := range []string{
			`"refresh::wal_stream::flush_delay" (1m0s) must be between 0 (the default, 1s) and 10s`,
			`"refresh::wal_stream::endpoint": "endpoint" "db-primary.example.internal" must be host:port`,
			`"refresh::wal_stream::password" is set without "refresh::wal_stream::username"`,
		} {
			assert.ErrorContains(t, err, want)
		}
		assert.ErrorContains(t, confmap.Validate(loadConfig(t, "wal_stream_off_with_settings")),
			`"refresh::wal_stream" has settings but is off: set "refresh::wal_stream::enabled: true"`)
	})
	t.Run("password_file", func(t *testing.T) {
		cfg := loadConfig(t, "password_file")
		require.NoError(t, confmap.Validate(cfg), "the file is read at start, not when the configuration is loaded")
		assert.Equal(t, "/run/secrets/pgconsistency-password", cfg.PasswordFile)
		assert.Empty(t, string(cfg.Password))
	})
	t.Run("short_interval without timeout", func(t *testing.T) {
		cfg := loadConfig(t, "short_interval")
		require.NoError(t, confmap.Validate(cfg))
		assert.Zero(t, cfg.Timeout)
		assert.Equal(t, 125*time.Millisecond, cfg.effectiveTimeout())
	})
	t.Run("secrets_and_timeout_wrong", func(t *testing.T) {
		err := confmap.Validate(loadConfig(t, "secrets_and_timeout_wrong"))
		require.Error(t, err)
		assert.ErrorContains(t, err, `"password" and "password_file" are both set: keep one`)
		assert.ErrorContains(t, err, `"timeout" (30s) must be shorter than "collection_interval" (30s)`)
	})
	t.Run("unix_socket", func(t *testing.T) {
		cfg := loadConfig(t, "unix_socket")
		require.NoError(t, confmap.Validate(cfg))
		host, port, err := cfg.hostPort()
		require.NoError(t, err)
		assert.Equal(t, "/var/run/postgresql", host)
		assert.Equal(t, uint16(5432), port)
	})
	t.Run("everything_wrong reports every problem at once", func(t *testing.T) {
		err := confmap.Validate(loadConfig(t, "everything_wrong"))
		require.Error(t, err)
		for _, want := range []string{
			`"transport" "udp" is not supported`,
			`"username" must be set`,
			`"database" must be set`,
			`"schema" "consistency" is not supported`,
			`"collection_interval": requires positive value`,
		} {
			assert.ErrorContains(t, err, want)
		}
	})
}

func TestValidateEndpoint(t *testing.T) {
	tests := []struct {
		name      string
		endpoint  string
		transport confignet.TransportType
		wantErr   string
	}{
		{name: "host and port", endpoint: "127.0.0.1:5432", transport: confignet.TransportTypeTCP},
		{name: "ipv6", endpoint: "[::1]:5432", transport: confignet.TransportTypeTCP},
		{name: "empty", endpoint: "", transport: confignet.TransportTypeTCP, wantErr: `"endpoint" must be set`},
		{name: "no port", endpoint: "db", transport: confignet.TransportTypeTCP, wantErr: `"endpoint" "db" must be host:port`},
		{name: "port not a number", endpoint: "db:pg", transport: confignet.TransportTypeTCP, wantErr: `invalid port "pg"`},
		{name: "port out of range", endpoint: "db:70000", transport: confignet.TransportTypeTCP, wantErr: `invalid port "70000"`},
		{name: "port zero", endpoint: "db:0", transport: confignet.TransportTypeTCP, wantErr: `invalid port "0"`},
		{name: "no host", endpoint: ":5432", transport: confignet.TransportTypeTCP, wantErr: `has no host`},
		{name: "unix relative", endpoint: "run/postgresql:5432", transport: confignet.TransportTypeUnix, wantErr: `absolute socket directory`},
		{name: "empty transport", endpoint: "db:5432", transport: "", wantErr: `"transport" "" is not supported`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := createDefaultConfig()
			cfg.Username, cfg.Database = "otel", "app"
			cfg.Endpoint, cfg.Transport = tt.endpoint, tt.transport
			err := confmap.Validate(cfg)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}

// TestValidateSchema: "schema" is deprecated. Unset or "pgconsistency" (the
// only schema the SQL installs into) is accepted; anything else is refused
// with the key and the fix, and never reaches a query.
func TestValidateSchema(t *testing.T) {
	tests := []struct {
		schema  string
		wantErr string
	}{
		{schema: ""},
		{schema: "pgconsistency"},
		{schema: "checks", wantErr: `"schema" "checks" is not supported: sql/install.sql installs pgconsistency into schema "pgconsistency"`},
		{schema: `pg"consistency`, wantErr: `remove "schema" (it is deprecated)`},
		{schema: "PgConsistency", wantErr: `is not supported`},
	}
	for _, tt := range tests {
		t.Run(tt.schema, func(t *testing.T) {
			cfg := createDefaultConfig()
			cfg.Username, cfg.Database = "otel", "app"
			cfg.Schema = tt.schema
			err := confmap.Validate(cfg)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}

func TestTimeout(t *testing.T) {
	tests := []struct {
		name      string
		interval  time.Duration
		timeout   time.Duration
		effective time.Duration
		wantErr   string
	}{
		{name: "default interval", interval: 60 * time.Second, effective: 10 * time.Second},
		{name: "derived is capped", interval: time.Hour, effective: 10 * time.Second},
		{name: "derived is half the interval", interval: 10 * time.Second, effective: 5 * time.Second},
		{name: "1s", interval: time.Second, effective: 500 * time.Millisecond},
		{name: "250ms", interval: 250 * time.Millisecond, effective: 125 * time.Millisecond},
		{name: "explicit below interval", interval: time.Minute, timeout: 59 * time.Second, effective: 59 * time.Second},
		{name: "explicit above the cap", interval: 5 * time.Minute, timeout: 30 * time.Second, effective: 30 * time.Second},
		{name: "explicit equal to interval", interval: time.Second, timeout: time.Second,
			wantErr: `"timeout" (1s) must be shorter than "collection_interval" (1s), so that a scrape ends before the next one is due: lower "timeout", or remove it`},
		{name: "explicit above interval", interval: 250 * time.Millisecond, timeout: 10 * time.Second,
			wantErr: `"timeout" (10s) must be shorter than "collection_interval" (250ms)`},
		{name: "negative", interval: time.Minute, timeout: -time.Second, wantErr: `"timeout": requires positive value`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := createDefaultConfig()
			cfg.Username, cfg.Database = "otel", "app"
			cfg.CollectionInterval, cfg.Timeout = tt.interval, tt.timeout
			err := confmap.Validate(cfg)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.effective, cfg.effectiveTimeout())
			// What the receiver runs with: the controller, the connect
			// timeout and statement_timeout all see the effective value.
			run := runConfig(cfg)
			assert.Equal(t, tt.effective, run.Timeout)
			assert.Equal(t, tt.timeout, cfg.Timeout, "the collector's configuration is left as written")
			cc, err := connConfig(t.Context(), run)
			require.NoError(t, err)
			assert.Equal(t, tt.effective, cc.ConnectTimeout)
		})
	}
}

func TestPasswordFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
		return path
	}
	tests := []struct {
		name    string
		path    string
		want    string
		wantErr []string
	}{
		{name: "trailing newline stripped", path: write("lf", "s3cret pw\n"), want: "s3cret pw"},
		{name: "CRLF stripped", path: write("crlf", "s3cret\r\n"), want: "s3cret"},
		{name: "no newline", path: write("plain", "s3cret"), want: "s3cret"},
		{name: "only one newline stripped", path: write("two", "s3cret\n\n"), want: "s3cret\n"},
		{name: "inner spaces kept", path: write("spaces", " a b \n"), want: " a b "},
		{name: "missing", path: filepath.Join(dir, "missing"),
			wantErr: []string{`"password_file": cannot read the password from "` + filepath.Join(dir, "missing") + `"`, "no such file or directory", "check the path"}},
		{name: "a directory", path: dir, wantErr: []string{`"password_file": cannot read the password from "` + dir + `"`}},
		{name: "empty", path: write("empty", ""), wantErr: []string{`"password_file" "` + filepath.Join(dir, "empty") + `" is empty`}},
		{name: "only a newline", path: write("newline", "\n"), wantErr: []string{`is empty: write the password in it`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := createDefaultConfig()
			cfg.Username, cfg.Database = "otel", "app"
			cfg.PasswordFile = tt.path
			require.NoError(t, confmap.Validate(cfg), "validation does not read the file")
			run := runConfig(cfg)
			err := run.loadPasswordFile()
			if tt.wantErr != nil {
				require.Error(t, err)
				for _, want := range tt.wantErr {
					assert.ErrorContains(t, err, want)
				}
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(run.Password))
			assert.Empty(t, string(cfg.Password), "the password goes into the receiver's copy only")
			cc, err := connConfig(t.Context(), run)
			require.NoError(t, err)
			assert.Equal(t, tt.want, cc.Password)
		})
	}
	t.Run("without password_file the password is kept", func(t *testing.T) {
		cfg := createDefaultConfig()
		cfg.Password = "inline"
		require.NoError(t, cfg.loadPasswordFile())
		assert.Equal(t, "inline", string(cfg.Password))
	})
}

// TestDeprecatedSchemaWarns: a configuration that still sets the deprecated
// "schema" (to the one schema that works) creates both receivers and logs a
// deprecation warning for each; without it, nothing is logged.
func TestDeprecatedSchemaWarns(t *testing.T) {
	for _, tt := range []struct {
		schema string
		warns  int
	}{{schema: "pgconsistency", warns: 2}, {schema: "", warns: 0}} {
		core, logs := observer.New(zapcore.WarnLevel)
		set := receivertest.NewNopSettings(metadata.Type)
		set.Logger = zap.New(core)
		cfg := createDefaultConfig()
		cfg.Username, cfg.Database, cfg.Schema = "otel", "app", tt.schema
		require.NoError(t, confmap.Validate(cfg))
		_, err := NewFactory().CreateMetrics(t.Context(), set, cfg, consumertest.NewNop())
		require.NoError(t, err)
		_, err = NewFactory().CreateLogs(t.Context(), set, cfg, consumertest.NewNop())
		require.NoError(t, err)
		deprecated := logs.FilterMessageSnippet(`"schema" is deprecated`).All()
		assert.Len(t, deprecated, tt.warns, "schema %q", tt.schema)
	}
}

// TestRenamedKeys: the names of refresh::poll_interval and
// logs::max_records_per_interval before 0.4.0 still work until 0.8.0, with
// a deprecation warning each; both names at once is an error naming both;
// a wrong value under the old name is reported under the old name.
func TestRenamedKeys(t *testing.T) {
	t.Run("old names work", func(t *testing.T) {
		cfg := loadConfig(t, "old_names")
		require.NoError(t, confmap.Validate(cfg))
		assert.Equal(t, 30*time.Second, cfg.Refresh.interval())
		assert.Equal(t, 20, cfg.Logs.maxRecords())
		assert.Equal(t, []string{
			`"refresh::schedule" is deprecated and will be removed in 0.8.0: rename it to "refresh::poll_interval" (same value)`,
			`"logs::max_records_per_scrape" is deprecated and will be removed in 0.8.0: rename it to "logs::max_records_per_interval" (same value)`,
		}, cfg.deprecations())

		core, logs := observer.New(zapcore.WarnLevel)
		set := receivertest.NewNopSettings(metadata.Type)
		set.Logger = zap.New(core)
		_, err := NewFactory().CreateMetrics(t.Context(), set, cfg, consumertest.NewNop())
		require.NoError(t, err)
		assert.Len(t, logs.FilterMessageSnippet(`"refresh::schedule" is deprecated`).All(), 1)
		assert.Len(t, logs.FilterMessageSnippet(`"logs::max_records_per_scrape" is deprecated`).All(), 1)
	})
	t.Run("both names", func(t *testing.T) {
		err := confmap.Validate(loadConfig(t, "old_and_new_names"))
		require.Error(t, err)
		assert.ErrorContains(t, err, `"refresh::schedule" and "refresh::poll_interval" are both set`)
		assert.ErrorContains(t, err, `"logs::max_records_per_scrape" and "logs::max_records_per_interval" are both set`)
	})
	t.Run("both names, the new one at its default", func(t *testing.T) {
		err := confmap.Validate(loadConfig(t, "old_and_new_names_default"))
		require.Error(t, err)
		assert.ErrorContains(t, err, `"logs::max_records_per_scrape" and "logs::max_records_per_interval" are both set`)
	})
	t.Run("old names wrong", func(t *testing.T) {
		err := confmap.Validate(loadConfig(t, "old_names_wrong"))
		require.Error(t, err)
		assert.ErrorContains(t, err, `"refresh::schedule" (-30s) must be positive`)
		assert.ErrorContains(t, err, `"logs::max_records_per_scrape" (-2) must be at least 1`)
	})
}

// TestMultiDatabaseConfig: "databases" and "discovery" watch several
// databases; exactly one of them or "database" is set, and the connections
// they need fit in max_connections. Every problem names its key and the fix.
func TestMultiDatabaseConfig(t *testing.T) {
	t.Run("databases", func(t *testing.T) {
		cfg := loadConfig(t, "databases")
		require.NoError(t, confmap.Validate(cfg))
		assert.Equal(t, []string{"app", "billing"}, cfg.Databases)
		assert.Empty(t, cfg.Database)
		assert.True(t, cfg.multiDatabase())
		assert.Equal(t, 30, cfg.MaxConnections, "the default bound")
		assert.Equal(t, 3, cfg.connectionsPerDatabase(), "scrape, refresh and changes")
		db := cfg.forDatabase("billing")
		assert.Equal(t, "billing", db.Database)
		assert.Empty(t, cfg.Database, "forDatabase copies")
	})
	t.Run("discovery", func(t *testing.T) {
		cfg := loadConfig(t, "discovery")
		require.NoError(t, confmap.Validate(cfg))
		assert.True(t, cfg.Discovery.Enabled)
		assert.Equal(t, 2*time.Minute, cfg.Discovery.Interval)
		assert.Equal(t, "postgres", cfg.Discovery.Database, "the default")
		assert.Equal(t, []string{"postgres", "scratch"}, cfg.Discovery.Exclude)
		assert.Equal(t, 2, cfg.connectionsPerDatabase(), "scrape and changes")
		assert.Equal(t, 2, cfg.maxDiscoveredDatabases(), "5 connections: 1 for discovery, 2 databases of 2")
	})
	t.Run("changes loop off", func(t *testing.T) {
		cfg := loadConfig(t, "databases_changes_off")
		require.NoError(t, confmap.Validate(cfg), "2 databases of 1 connection each")
		assert.Zero(t, cfg.Refresh.ChangesInterval)
		assert.Equal(t, 1, cfg.connectionsPerDatabase(), "scrape only")
	})
	t.Run("single database is unchanged", func(t *testing.T) {
		cfg := loadConfig(t, "minimal")
		require.NoError(t, confmap.Validate(cfg))
		assert.False(t, cfg.multiDatabase())
		assert.False(t, cfg.Discovery.Enabled)
		assert.Equal(t, 5*time.Minute, cfg.Discovery.Interval)
	})
	tests := []struct {
		name string
		want []string
	}{
		{"database_and_databases", []string{`"database", "databases" and "discovery::enabled" are exclusive, and more than one is set`}},
		{"databases_wrong", []string{
			`"databases" entry 1 is empty: write the name of a database, or remove the entry`,
			`"databases" lists "app" twice: list each database once`,
			`"max_connections" (3) is too low for the 5 databases of "databases": each takes 2 (one to scrape, ` +
				`one for the changes loop of refresh::changes_interval, which 0 turns off); raise "max_connections" to 10, or list fewer databases`,
		}},
		{"databases_over_bound_with_refresh", []string{
			`"max_connections" (3) is too low for the 2 databases of "databases": each takes 3 (one to scrape, one for the refresh scheduler of refresh::poll_interval, ` +
				`one for the changes loop of refresh::changes_interval, which 0 turns off); raise "max_connections" to 6`,
		}},
		{"databases_over_bound_without_changes", []string{
			`"max_connections" (3) is too low for the 2 databases of "databases": each takes 2 (one to scrape, one for the refresh scheduler of refresh::poll_interval); raise "max_connections" to 4`,
		}},
		{"discovery_wrong", []string{
			`"discovery::interval" (0s) must be positive`,
			`"discovery::database" must be set`,
			`"discovery::exclude" entry 0 is empty`,
			`"max_connections" (2) is too low for discovery: it needs 1 connection to list the databases and 3 per database watched`,
			`raise "max_connections" to at least 4`,
		}},
		{"exclude_without_discovery", []string{`"discovery::exclude" is set but discovery is off: set "discovery::enabled: true", or remove "discovery::exclude"`}},
		{"max_connections_zero", []string{`"max_connections" (0) must be at least 1`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := confmap.Validate(loadConfig(t, tt.name))
			require.Error(t, err)
			for _, want := range tt.want {
				assert.ErrorContains(t, err, want)
			}
		})
	}
}
