package pgconsistencyreceiver

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// TestLogsRefuseSeveralDatabases: a logs pipeline reads one database's log
// cursor; a receiver with databases or discovery is refused there, with
// what to do instead, and still works in a metrics pipeline.
func TestLogsRefuseSeveralDatabases(t *testing.T) {
	for name, set := range map[string]func(*Config){
		"databases": func(cfg *Config) { cfg.Databases = []string{"app", "billing"} },
		"discovery": func(cfg *Config) { cfg.Discovery.Enabled = true },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := createDefaultConfig()
			cfg.Username = "otel"
			set(cfg)
			require.NoError(t, cfg.Validate())
			_, err := NewFactory().CreateLogs(t.Context(), receivertest.NewNopSettings(metadata.Type), cfg, consumertest.NewNop())
			require.ErrorIs(t, err, errMultiDatabaseLogs)
			assert.ErrorContains(t, err, `in a logs pipeline, use one receiver per database with "database"`)
			_, err = NewFactory().CreateMetrics(t.Context(), receivertest.NewNopSettings(metadata.Type), cfg, consumertest.NewNop())
			require.NoError(t, err)
		})
	}
}

// TestPasswordFileUnreadableAtStart: a password_file that cannot be read
// stops Start of both receivers with an error naming the key and the path
// (not at configuration load: validation passes).
func TestPasswordFileUnreadableAtStart(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-secret")
	cfg := createDefaultConfig()
	cfg.Username, cfg.Database = "otel", "app"
	cfg.Endpoint = "127.0.0.1:1"
	cfg.PasswordFile = missing
	require.NoError(t, cfg.Validate())
	want := `"password_file": cannot read the password from "` + missing + `"`

	set := receivertest.NewNopSettings(metadata.Type)
	mr, err := NewFactory().CreateMetrics(t.Context(), set, cfg, new(consumertest.MetricsSink))
	require.NoError(t, err)
	require.ErrorContains(t, mr.Start(t.Context(), nil), want)
	require.NoError(t, mr.Shutdown(context.Background()))

	lr, err := NewFactory().CreateLogs(t.Context(), set, cfg, new(consumertest.LogsSink))
	require.NoError(t, err)
	require.ErrorContains(t, lr.Start(t.Context(), nil), want)
	require.NoError(t, lr.Shutdown(context.Background()))
}
