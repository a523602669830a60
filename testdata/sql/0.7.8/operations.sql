-- pgconsistency operations pack (optional; not part of install.sql).
--
--   psql -v ON_ERROR_STOP=1 -d DB -f sql/operations.sql
--
-- Invariants of the database itself rather than of the application's data:
-- invalid indexes, long transactions, sessions idle in a transaction, long
-- lock waits, deadlocks, sequences near their limit, constraints left NOT
-- VALID; and pgconsistency.define_job_queue_latency(), a template that turns
-- any job table into a latency invariant. Every query reads catalogs and
-- statistics views only (the job-queue template reads its job table), so a
-- refresh costs milliseconds: they are refreshed every minute.
--
-- Scope: sessions, locks and deadlocks of the current database only (the pack
-- is installed per database; each database reports its own sessions).
--
-- Thresholds are parameters of each invariant (pgconsistency.invariant_parameter),
-- read by the queries at refresh time and changed with
--   SELECT pgconsistency.set_parameter('transaction_long_running', 'threshold', '30 minutes');
--
-- Privileges: a refresh runs as the owner of the views. To see the sessions,
-- query texts and locks of other roles, that owner must be a superuser or a
-- member of pg_read_all_stats (GRANT pg_read_all_stats TO <owner>); without it
-- the session invariants see other roles' sessions without their query text,
-- and sequence_near_exhaustion skips sequences the owner may not read.
--
-- Run it after sql/install.sql. Idempotent: re-running keeps the views and
-- their snapshots, changed parameters, refresh_period, enabled and the other
-- per-invariant settings. The whole file is one transaction.

\set ON_ERROR_STOP 1
\set QUIET on
SET client_min_messages = warning;

BEGIN;

DO $check$
BEGIN
    IF pg_catalog.to_regprocedure('pgconsistency._install_comment(text, text)') IS NULL THEN
        RAISE EXCEPTION 'pgconsistency is not installed (or is older than this pack) in database %', pg_catalog.current_database()
            USING HINT = 'Run sql/install.sql first, then sql/operations.sql.';
    END IF;
END
$check$;

-- Upgrades: before 0.4.0 the pack's internal function had no leading
-- underscore. Renamed in place (the invariant's after_refresh is updated
-- below).
DO $do$
BEGIN
    IF pg_catalog.to_regprocedure('pgconsistency.deadlocks_remember(text)') IS NOT NULL
       AND pg_catalog.to_regprocedure('pgconsistency._deadlocks_remember(text)') IS NULL THEN
        ALTER FUNCTION pgconsistency.deadlocks_remember(text) RENAME TO _deadlocks_remember;
    END IF;
END
$do$;

-- define_operations_invariant: define_invariant() for a cheap, frequent check.
-- A newly created invariant gets a 1-minute refresh period and short
-- guardrails; an existing one keeps what the DBA set (re-running the pack
-- must not undo a change of refresh_period or timeouts). Returns whether the
-- invariant was new.
CREATE OR REPLACE FUNCTION pgconsistency.define_operations_invariant(
    name        text,
    query       text,
    severity    text,
    description text
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_new boolean := NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = define_operations_invariant.name);
BEGIN
    PERFORM pgconsistency.define_invariant(name, query, severity, description);
    IF v_new THEN
        -- A check of a few catalog rows: a refresh that waits 5 s for a lock
        -- or runs 30 s is broken, and must not queue anything behind it.
        UPDATE pgconsistency.invariant i
           SET refresh_period = interval '1 minute',
               statement_timeout = interval '30 seconds',
               lock_timeout = interval '5 seconds'
         WHERE i.name = define_operations_invariant.name;
    END IF;
    RETURN v_new;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.define_operations_invariant(text, text, text, text) IS
  'define_invariant() with a 1-minute refresh period for a new invariant; keeps the settings of an existing one';

\o /dev/null

-- index_invalid: an index left INVALID, typically by a CREATE INDEX
-- CONCURRENTLY or REINDEX CONCURRENTLY that failed or was cancelled (a
-- migration timeout). The planner ignores it, writes may still maintain it,
-- and a unique one may still reject rows. Indexes being built right now are
-- not anomalies. Fix: DROP INDEX CONCURRENTLY, then build it again.
SELECT pgconsistency.define_operations_invariant(
    name        => 'index_invalid',
    severity    => 'warning',
    description => 'Index marked invalid (indisvalid = false), e.g. left by a failed CREATE INDEX CONCURRENTLY',
    query       => $q$
SELECT pg_catalog.format('%I.%I', n.nspname, ic.relname) AS key,
       pg_catalog.format('%I.%I', tn.nspname, tc.relname) AS table_name,
       i.indisunique AS is_unique,
       i.indisready AS maintained_by_writes,
       pg_catalog.left(pg_catalog.pg_get_indexdef(i.indexrelid), 300) AS definition
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace
  JOIN pg_catalog.pg_class tc ON tc.oid = i.indrelid
  JOIN pg_catalog.pg_namespace tn ON tn.oid = tc.relnamespace
 WHERE NOT i.indisvalid
   AND n.nspname !~ '^pg_temp_'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_progress_create_index p
                    WHERE p.index_relid = i.indexrelid OR (p.relid = i.indrelid AND p.index_relid = 0))
$q$) AS created;

-- transaction_long_running: a transaction open longer than the threshold.
-- It holds back vacuum (dead rows pile up everywhere, not only in the tables
-- it touched) and keeps its locks. Key: pid and transaction start, so a new
-- transaction of the same session is a new anomaly.
SELECT pgconsistency.define_operations_invariant(
    name        => 'transaction_long_running',
    severity    => 'warning',
    description => 'Transaction open longer than the threshold parameter (default 1 hour)',
    query       => $q$
SELECT a.pid::text || ':' || pg_catalog.to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS key,
       a.pid,
       a.xact_start,
       a.usename::text AS usename,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       a.backend_type,
       a.state,
       a.wait_event_type,
       a.wait_event,
       a.query_start,
       pg_catalog.left(a.query, 200) AS query
  FROM pg_catalog.pg_stat_activity a
 WHERE a.datname = pg_catalog.current_database()
   AND a.pid <> pg_catalog.pg_backend_pid()
   AND a.xact_start IS NOT NULL
   AND a.backend_type <> 'autovacuum worker'
   AND a.xact_start < pg_catalog.now()
         - (SELECT pgconsistency.parameter('transaction_long_running', 'threshold'))::interval
$q$) AS created;
SELECT pgconsistency.define_parameter('transaction_long_running', 'threshold', 'interval', '1 hour',
    'a transaction open longer than this is an anomaly');

-- session_idle_in_transaction: a session that opened a transaction and then
-- went quiet (an application that forgot to commit, a paused debugger, a
-- psql left open). Same harm as a long transaction, and nothing is even
-- running. Key: pid and transaction start.
SELECT pgconsistency.define_operations_invariant(
    name        => 'session_idle_in_transaction',
    severity    => 'warning',
    description => 'Session idle in a transaction longer than the threshold parameter (default 10 minutes)',
    query       => $q$
SELECT a.pid::text || ':' || pg_catalog.to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS key,
       a.pid,
       a.state,
       a.state_change AS idle_since,
       a.xact_start,
       a.usename::text AS usename,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       pg_catalog.left(a.query, 200) AS last_query
  FROM pg_catalog.pg_stat_activity a
 WHERE a.datname = pg_catalog.current_database()
   AND a.pid <> pg_catalog.pg_backend_pid()
   AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
   AND a.state_change < pg_catalog.now()
         - (SELECT pgconsistency.parameter('session_idle_in_transaction', 'threshold'))::interval
$q$) AS created;
SELECT pgconsistency.define_parameter('session_idle_in_transaction', 'threshold', 'interval', '10 minutes',
    'a session idle in a transaction for longer than this is an anomaly');

-- lock_wait_long: a session waiting for a lock longer than the threshold,
-- with who blocks it. pg_locks.waitstart (PostgreSQL 14+) says when the wait
-- began. Key: pid and wait start (one wait per backend at a time).
SELECT pgconsistency.define_operations_invariant(
    name        => 'lock_wait_long',
    severity    => 'warning',
    description => 'Session waiting for a lock longer than the threshold parameter (default 1 minute)',
    query       => $q$
SELECT DISTINCT ON (a.pid)
       a.pid::text || ':' || pg_catalog.to_char(l.waitstart AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS key,
       a.pid,
       l.waitstart AS waiting_since,
       l.locktype,
       l.mode,
       CASE WHEN l.relation IS NOT NULL THEN l.relation::pg_catalog.regclass::text END AS table_name,
       b.blocking_pids,
       b.blocking_sessions,
       a.usename::text AS usename,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       a.wait_event_type,
       a.wait_event,
       a.xact_start,
       pg_catalog.left(a.query, 200) AS query
  FROM pg_catalog.pg_locks l
  JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
  CROSS JOIN LATERAL (
      SELECT pg_catalog.array_agg(DISTINCT bp ORDER BY bp) AS blocking_pids,
             pg_catalog.string_agg(DISTINCT pg_catalog.format('%s %s (%s): %s', bp,
                 coalesce(nullif(ba.application_name, ''), '-'), coalesce(ba.state, '?'),
                 pg_catalog.left(ba.query, 100)), '; ') AS blocking_sessions
        FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(a.pid)) AS bp
        LEFT JOIN pg_catalog.pg_stat_activity ba ON ba.pid = bp) b
 WHERE NOT l.granted
   AND l.waitstart IS NOT NULL
   AND a.datname = pg_catalog.current_database()
   AND a.pid <> pg_catalog.pg_backend_pid()
   AND l.waitstart < pg_catalog.now()
         - (SELECT pgconsistency.parameter('lock_wait_long', 'threshold'))::interval
 ORDER BY a.pid, l.waitstart
$q$) AS created;
SELECT pgconsistency.define_parameter('lock_wait_long', 'threshold', 'interval', '1 minute',
    'a lock wait longer than this is an anomaly');

-- deadlocks_detected: deadlocks PostgreSQL detected (and broke by aborting a
-- transaction) in this database since the previous refresh. pg_stat_database
-- counts them; the counter seen by each refresh is remembered in
-- deadlock_baseline by _deadlocks_remember(), called by refresh_invariant
-- after the refresh (after_refresh). The anomaly shows at the refresh after
-- the deadlock and is resolved at the next one without a new deadlock. The
-- first refresh only records the baseline; a statistics reset starts a new
-- one. The server log holds each deadlock's details ("deadlock detected").
CREATE TABLE IF NOT EXISTS pgconsistency.deadlock_baseline (
    datname     text        PRIMARY KEY,
    deadlocks   bigint      NOT NULL,
    stats_reset timestamptz,
    recorded_at timestamptz NOT NULL
);
SELECT pgconsistency._install_comment('pgconsistency.deadlock_baseline',
  'pg_stat_database.deadlocks as seen by the latest refresh of deadlocks_detected');

-- Reads pg_stat_database in the refresh's transaction: with the default
-- stats_fetch_consistency (cache) it sees the same value the view's query saw.
CREATE OR REPLACE FUNCTION pgconsistency._deadlocks_remember(invariant text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    INSERT INTO pgconsistency.deadlock_baseline AS b (datname, deadlocks, stats_reset, recorded_at)
    SELECT d.datname::text, d.deadlocks, d.stats_reset, pg_catalog.now()
      FROM pg_catalog.pg_stat_database d
     WHERE d.datname = pg_catalog.current_database()
    ON CONFLICT ON CONSTRAINT deadlock_baseline_pkey DO UPDATE
       SET deadlocks = EXCLUDED.deadlocks, stats_reset = EXCLUDED.stats_reset, recorded_at = EXCLUDED.recorded_at
$fn$;
COMMENT ON FUNCTION pgconsistency._deadlocks_remember(text) IS
  'Internal: after_refresh of deadlocks_detected, records the deadlock counter the refresh saw';

SELECT pgconsistency.define_operations_invariant(
    name        => 'deadlocks_detected',
    severity    => 'warning',
    description => 'Deadlocks detected in this database since the previous refresh (pg_stat_database.deadlocks)',
    query       => $q$
SELECT d.datname::text AS key,
       d.deadlocks - b.deadlocks AS new_deadlocks,
       d.deadlocks AS total_deadlocks,
       b.recorded_at AS since
  FROM pg_catalog.pg_stat_database d
  JOIN pgconsistency.deadlock_baseline b ON b.datname = d.datname::text
 WHERE d.datname = pg_catalog.current_database()
   AND d.deadlocks > b.deadlocks
   AND d.stats_reset IS NOT DISTINCT FROM b.stats_reset
$q$) AS created;
UPDATE pgconsistency.invariant i SET after_refresh = 'pgconsistency._deadlocks_remember'
 WHERE i.name = 'deadlocks_detected' AND i.after_refresh IS DISTINCT FROM 'pgconsistency._deadlocks_remember';

-- sequence_near_exhaustion: a sequence that has used more than the threshold
-- of its range. The limit is the lower of the sequence's own maximum and
-- that of the smallest integer column it feeds (owned by: serial, identity,
-- OWNED BY; or named in a column's DEFAULT nextval(...)): a bigint sequence
-- behind an integer column fails at 2147483647. Descending sequences are
-- measured against their minimum. Sequences never used (last_value NULL) or
-- that the owner may not read are skipped.
SELECT pgconsistency.define_operations_invariant(
    name        => 'sequence_near_exhaustion',
    severity    => 'critical',
    description => 'Sequence (or identity) past the threshold_percent parameter (default 80) of its limit, column type included',
    query       => $q$
WITH feeds AS (
    -- columns a sequence feeds: owned by (auto / internal dependency) ...
    SELECT d.objid AS seqid, d.refobjid AS relid, d.refobjsubid AS attnum
      FROM pg_catalog.pg_depend d
     WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    UNION
    -- ... or named in a column default
    SELECT d.refobjid, ad.adrelid, ad.adnum
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid
     WHERE d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
),
columns AS (
    SELECT f.seqid,
           pg_catalog.format('%I.%I.%I', n.nspname, c.relname, a.attname) AS column_name,
           pg_catalog.format_type(a.atttypid, a.atttypmod) AS column_type,
           CASE a.atttypid WHEN 'pg_catalog.int2'::pg_catalog.regtype THEN 32767::numeric
                           WHEN 'pg_catalog.int4'::pg_catalog.regtype THEN 2147483647::numeric
                           WHEN 'pg_catalog.int8'::pg_catalog.regtype THEN 9223372036854775807::numeric END AS type_max,
           CASE a.atttypid WHEN 'pg_catalog.int2'::pg_catalog.regtype THEN -32768::numeric
                           WHEN 'pg_catalog.int4'::pg_catalog.regtype THEN -2147483648::numeric
                           WHEN 'pg_catalog.int8'::pg_catalog.regtype THEN -9223372036854775808::numeric END AS type_min
      FROM feeds f
      JOIN pg_catalog.pg_class c ON c.oid = f.relid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid = f.relid AND a.attnum = f.attnum AND NOT a.attisdropped
),
seqs AS (
    SELECT s.seqrelid,
           pg_catalog.format('%I.%I', n.nspname, c.relname) AS sequence_name,
           pg_catalog.format_type(s.seqtypid, NULL) AS sequence_type,
           s.seqincrement, s.seqmax::numeric AS seqmax, s.seqmin::numeric AS seqmin, s.seqcycle,
           CASE WHEN pg_catalog.has_sequence_privilege(c.oid, 'SELECT,USAGE')
                THEN pg_catalog.pg_sequence_last_value(c.oid)::numeric END AS last_value
      FROM pg_catalog.pg_sequence s
      JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname !~ '^pg_temp_'
),
limits AS (
    -- the tightest limit: the sequence's own, or that of its narrowest column
    SELECT DISTINCT ON (s.seqrelid)
           s.*, col.column_name, col.column_type,
           CASE WHEN s.seqincrement > 0
                THEN LEAST(s.seqmax, col.type_max)
                ELSE GREATEST(s.seqmin, col.type_min) END AS limit_value,
           CASE WHEN s.seqincrement > 0 AND col.type_max < s.seqmax
                  OR s.seqincrement < 0 AND col.type_min > s.seqmin
                THEN 'type ' || col.column_type || ' of column ' || col.column_name
                ELSE CASE WHEN s.seqincrement > 0 THEN 'maximum' ELSE 'minimum' END || ' of the sequence' END AS limited_by
      FROM seqs s
      LEFT JOIN columns col ON col.seqid = s.seqrelid
     WHERE s.last_value IS NOT NULL
     ORDER BY s.seqrelid,
              CASE WHEN s.seqincrement > 0 THEN col.type_max ELSE -col.type_min END NULLS LAST
)
SELECT l.sequence_name AS key,
       l.sequence_type,
       l.column_name,
       l.column_type,
       l.last_value,
       l.limit_value,
       l.limited_by,
       pg_catalog.round(100 * l.last_value / l.limit_value, 2) AS used_percent,
       l.seqcycle AS cycles
  FROM limits l
 WHERE (l.seqincrement > 0 AND l.limit_value > 0 OR l.seqincrement < 0 AND l.limit_value < 0)
   AND 100 * l.last_value / l.limit_value
       >= (SELECT pgconsistency.parameter('sequence_near_exhaustion', 'threshold_percent'))::numeric
$q$) AS created;
SELECT pgconsistency.define_parameter('sequence_near_exhaustion', 'threshold_percent', 'numeric', '80',
    'a sequence that has used this percentage of its limit (or more) is an anomaly');

-- constraint_not_validated: a CHECK or FOREIGN KEY constraint added NOT VALID
-- and never validated: new rows are checked, the old ones never were. Usually
-- the second step of a two-step migration that was forgotten. Fix:
-- ALTER TABLE ... VALIDATE CONSTRAINT (takes only a SHARE UPDATE EXCLUSIVE lock).
SELECT pgconsistency.define_operations_invariant(
    name        => 'constraint_not_validated',
    severity    => 'warning',
    description => 'Constraint left NOT VALID (existing rows never checked)',
    query       => $q$
SELECT pg_catalog.format('%I.%I.%I', n.nspname, coalesce(c.relname, t.typname), con.conname) AS key,
       CASE WHEN c.oid IS NOT NULL THEN pg_catalog.format('%I.%I', n.nspname, c.relname) END AS table_name,
       CASE WHEN t.oid IS NOT NULL THEN pg_catalog.format('%I.%I', n.nspname, t.typname) END AS domain_name,
       CASE con.contype WHEN 'c' THEN 'check' WHEN 'f' THEN 'foreign key' WHEN 'n' THEN 'not null'
                        ELSE con.contype::text END AS constraint_type,
       pg_catalog.left(pg_catalog.pg_get_constraintdef(con.oid), 300) AS definition
  FROM pg_catalog.pg_constraint con
  JOIN pg_catalog.pg_namespace n ON n.oid = con.connamespace
  LEFT JOIN pg_catalog.pg_class c ON c.oid = con.conrelid AND con.conrelid <> 0
  LEFT JOIN pg_catalog.pg_type t ON t.oid = con.contypid AND con.contypid <> 0
 WHERE NOT con.convalidated
   AND n.nspname !~ '^pg_temp_'
$q$) AS created;

\o

-- define_job_queue_latency: a latency invariant for a job table. Anomalies
-- are the jobs still pending (pending_condition) created more than threshold
-- ago; key: the job's id. pending_condition is SQL pasted into the view's
-- WHERE clause as it is (columns of the job table unqualified), so it must
-- come from a trusted DBA, never from user input; the other names are quoted.
-- The threshold is the invariant's "threshold" parameter: this call sets it,
-- set_parameter() changes it afterwards. An index on the created column (or
-- a partial one matching the pending condition) keeps the 1-minute refresh
-- cheap on a large table.
CREATE OR REPLACE FUNCTION pgconsistency.define_job_queue_latency(
    name              text,
    job_table         regclass,
    id_column         text,
    created_column    text,
    pending_condition text,
    threshold         interval DEFAULT '5 minutes',
    severity          text DEFAULT 'warning'
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_table text := job_table::text; -- qualified: search_path is pg_catalog only
    v_created_type regtype;
BEGIN
    IF coalesce(pg_catalog.btrim(pending_condition), '') = '' THEN
        RAISE EXCEPTION 'pgconsistency: define_job_queue_latency(%): pending_condition is empty', coalesce(name, 'NULL')
            USING HINT = 'Pass the SQL condition that is true for a job still waiting, e.g. $$status = ''pending''$$, or $$true$$ if done jobs are deleted.';
    END IF;
    IF threshold IS NULL OR threshold <= interval '0' THEN
        RAISE EXCEPTION 'pgconsistency: define_job_queue_latency(%): threshold must be positive, got %', name, coalesce(threshold::text, 'NULL');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = job_table AND a.attname = id_column AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pgconsistency: define_job_queue_latency(%): table % has no column % (id_column)', name, v_table, coalesce(id_column, 'NULL')
            USING HINT = 'Pass the name of the column that identifies a job, e.g. ''id''.';
    END IF;
    SELECT a.atttypid INTO v_created_type FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = job_table AND a.attname = created_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: define_job_queue_latency(%): table % has no column % (created_column)', name, v_table, coalesce(created_column, 'NULL')
            USING HINT = 'Pass the column holding when the job was created or became runnable, e.g. ''created_at'' or ''run_at''.';
    END IF;
    IF v_created_type NOT IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN
        RAISE EXCEPTION 'pgconsistency: define_job_queue_latency(%): column %.% is %, expected a timestamp', name, v_table, created_column, v_created_type;
    END IF;

    PERFORM pgconsistency.define_operations_invariant(
        name,
        pg_catalog.format($q$
SELECT j.%1$I::text AS key,
       j.%2$I AS created_at,
       %3$L::text AS job_table
  FROM %4$s AS j
 WHERE (%5$s)
   AND j.%2$I < pg_catalog.now() - (SELECT pgconsistency.parameter(%6$L, 'threshold'))::interval
$q$, id_column, created_column, v_table, v_table, pending_condition, name),
        severity,
        pg_catalog.format('Jobs of %s pending for longer than the threshold parameter', v_table));
    PERFORM pgconsistency.define_parameter(name, 'threshold', 'interval', threshold::text,
        'a job still pending this long after its creation is an anomaly');
    PERFORM pgconsistency.set_parameter(name, 'threshold', threshold::text);
END
$fn$;
COMMENT ON FUNCTION pgconsistency.define_job_queue_latency(text, regclass, text, text, text, interval, text) IS
  'Register a latency invariant for a job table: pending jobs older than threshold (pending_condition is trusted SQL)';

-- As in the framework (sql/framework/10_privileges.sql): nothing in the
-- schema is executable by PUBLIC.
REVOKE EXECUTE ON FUNCTION pgconsistency.define_operations_invariant(text, text, text, text),
       pgconsistency._deadlocks_remember(text),
       pgconsistency.define_job_queue_latency(text, regclass, text, text, text, interval, text) FROM PUBLIC;

COMMIT;
