//go:build integration

package bench

import (
	"os"
	"os/exec"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestGenerate checks generate.sql and write_load.sql at a small scale, as
// make bench uses them: the shape of the data, every dataset invariant at
// exactly its injected count (4,000 datasets: every shape of the chain-gap
// and unknown-ref-name anomalies), and the same counts after a write load.
func TestGenerate(t *testing.T) {
	const n = 4000
	srv := pgtest.Start(t)
	db := srv.CreateDatabase(t, "")
	srv.PsqlFile(t, db, fixture.Path(schema))
	srv.Psql(t, db, "-v", "scale="+strconv.Itoa(n), "-f", fixture.Path("internal/bench/generate.sql"))
	srv.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	conn := srv.Conn(t, db)
	ctx := t.Context()
	query := func(q string) float64 {
		t.Helper()
		var v float64
		require.NoError(t, conn.QueryRow(ctx, q).Scan(&v), q)
		return v
	}

	assert.EqualValues(t, n, query(`SELECT count(*) FROM public.dataset_entries`))
	assert.EqualValues(t, n/10+1, query(`SELECT count(*) FROM public.accounts`))
	assert.EqualValues(t, 0.3*n, query(`SELECT count(*) FROM public.dataset_entries WHERE kind = 'derivative'`))
	// 5 key blocks and 1 + i % 8 data blocks per dataset, but for the
	// anomalies (a few blocks deleted or added).
	assert.InDelta(t, 5*n, query(`SELECT count(*) FROM public.dataset_key_blocks`), 40)
	assert.InDelta(t, 4.5*n, query(`SELECT count(*) FROM public.dataset_data_blocks`), 40)
	assert.Zero(t, query(`SELECT count(*) FROM public.dataset_key_blocks WHERE length(block_hash_bin) <> 32
	                      UNION ALL SELECT count(*) FROM public.dataset_data_blocks WHERE length(block_hash_bin) <> 32
	                      ORDER BY 1 DESC LIMIT 1`))
	assert.InDelta(t, 150, query(`SELECT avg(length(block_payload)) FROM public.dataset_key_blocks`), 30)
	assert.InDelta(t, 150, query(`SELECT avg(length(block_payload)) FROM public.dataset_data_blocks`), 30)
	assert.EqualValues(t, 69, query(`SELECT min(length(block_hash_hex)) FROM public.dataset_references`))
	// The drift the duplicated-* anomalies need: plain, not unique, indexes.
	assert.Zero(t, query(`SELECT count(*) FROM pg_catalog.pg_index
	                       WHERE indexrelid IN ('public.idx_dataset_references'::regclass, 'public.idx_dataset_statistics'::regclass)
	                         AND indisunique`))

	_, err := conn.Exec(ctx, `CALL pgconsistency.refresh(force => true)`)
	require.NoError(t, err)
	checkCounts(t, conn, n, "after generate.sql")

	// Two clients, 100 datasets each: the accounts they share are created
	// once, and nothing becomes an anomaly.
	srv.Psql(t, db, "-c", "CREATE SEQUENCE public.bench_write_seq")
	cmd := exec.Command(pgbenchPath(t), "-n", "-c", "2", "-j", "2", "-t", "100",
		"-f", fixture.Path("internal/bench/write_load.sql"), "-h", srv.Host, "-p", strconv.Itoa(srv.Port), "-U", srv.User, db)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+srv.Password)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.EqualValues(t, n+200, query(`SELECT count(*) FROM public.dataset_entries`))
	assert.EqualValues(t, n/10+1+21, query(`SELECT count(*) FROM public.accounts`))
	assert.EqualValues(t, 5*200, query(`SELECT count(*) FROM public.dataset_key_blocks WHERE dataset_id LIKE 'did:odf:fed02%'`))
	assert.EqualValues(t, 900, query(`SELECT count(*) FROM public.dataset_data_blocks WHERE dataset_id LIKE 'did:odf:fed02%'`))
	_, err = conn.Exec(ctx, `CALL pgconsistency.refresh(force => true)`)
	require.NoError(t, err)
	checkCounts(t, conn, n, "after the write load")
}
