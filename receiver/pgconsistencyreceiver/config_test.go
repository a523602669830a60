package pgconsistencyreceiver

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/config/confignet"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/confmaptest"

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
	assert.Equal(t, "pgconsistency", cfg.Schema)
	assert.Equal(t, 60*time.Second, cfg.CollectionInterval)
	assert.Equal(t, 10*time.Second, cfg.Timeout)
	assert.False(t, cfg.TLS.Insecure, "TLS is on by default")
	assert.True(t, cfg.TLS.InsecureSkipVerify, "like sslmode=require by default")
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
		assert.Equal(t, "pgconsistency", cfg.Schema)
	})
	t.Run("all_settings", func(t *testing.T) {
		cfg := loadConfig(t, "all_settings")
		require.NoError(t, confmap.Validate(cfg))
		assert.Equal(t, "db.example.internal:6432", cfg.Endpoint)
		assert.Equal(t, "s3cret", string(cfg.Password))
		assert.Equal(t, "consistency", cfg.Schema)
		assert.Equal(t, 5*time.Minute, cfg.CollectionInterval)
		assert.Equal(t, 20*time.Second, cfg.Timeout)
		assert.Equal(t, 2*time.Second, cfg.InitialDelay)
		assert.False(t, cfg.TLS.InsecureSkipVerify)
		assert.Equal(t, "/etc/ssl/certs/db-ca.pem", cfg.TLS.CAFile)
		assert.False(t, cfg.Metrics.PgconsistencyRefreshDuration.Enabled)
		assert.Equal(t, time.Minute, cfg.Refresh.Schedule)
		assert.Equal(t, "SELECT max(version) FROM public.schema_migrations", cfg.Refresh.DeployMarker.Query)
		assert.Equal(t, 15*time.Minute, cfg.Refresh.DeployMarker.Delay)
		assert.True(t, cfg.Metrics.PgconsistencyAnomalies.Enabled)
		host, port, err := cfg.hostPort()
		require.NoError(t, err)
		assert.Equal(t, "db.example.internal", host)
		assert.Equal(t, uint16(6432), port)
	})
	t.Run("refresh settings", func(t *testing.T) {
		cfg := loadConfig(t, "minimal")
		assert.Zero(t, cfg.Refresh.Schedule, "the scheduler is off by default: pg_cron or the DBA's cron refreshes")
		assert.Equal(t, 10*time.Minute, cfg.Refresh.DeployMarker.Delay)
		assert.Equal(t, 100, cfg.Logs.MaxRecordsPerScrape)
		err := confmap.Validate(loadConfig(t, "marker_without_schedule"))
		require.Error(t, err)
		for _, want := range []string{
			`"refresh::schedule" (-1m0s) must be positive`,
			`"refresh::deploy_marker::query" needs "refresh::schedule"`,
			`"refresh::deploy_marker::delay" (-5m0s) must be zero or more`,
			`"logs::max_records_per_scrape" (0) must be at least 1`,
		} {
			assert.ErrorContains(t, err, want)
		}
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
			`"schema" must not be empty`,
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

func TestValidateSchemaLength(t *testing.T) {
	cfg := createDefaultConfig()
	cfg.Username, cfg.Database = "otel", "app"
	cfg.Schema = "s234567890123456789012345678901234567890123456789012345678901234"
	require.ErrorContains(t, confmap.Validate(cfg), "longer than 63 bytes")
}
