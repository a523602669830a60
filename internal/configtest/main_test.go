package configtest_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// TestMain runs the tests in config/, so that they name its files as a
// reader of config/ does ("grafana/dashboards/...", "prometheus-rules.yaml").
func TestMain(m *testing.M) {
	if err := os.Chdir(testkit.Path("config")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}
