-- pgconsistency framework: the registry of invariants, their refresh state,
-- the refresh procedure and the status view the receiver reads.
--
-- Idempotent: safe to run again on every deployment (install.sql includes it).
-- Every name is schema-qualified and every function pins its search_path,
-- because PostgreSQL 17+ runs REFRESH MATERIALIZED VIEW with a safe search_path
-- and because callers (pg_cron, deploy tools) may have any search_path.
--
-- Privileges: the functions that refresh or write pgconsistency's state are
-- SECURITY DEFINER (they run as the owner of the schema, who owns the views),
-- so that a role granted EXECUTE on them needs no privilege on the tables
-- behind them, nor on the application's tables. EXECUTE is revoked from
-- PUBLIC at the end of this file; sql/roles.sql grants what a reader (the
-- receiver) and a refresher (pg_cron, deploy pipelines) need.

CREATE SCHEMA IF NOT EXISTS pgconsistency;

-- version: the version of the SQL installed, the top entry of CHANGELOG.md.
-- install.sql upgrades any older install in place: the install_* helpers
-- below add what an older release lacks, without waiting on locks when
-- nothing is missing.
CREATE OR REPLACE FUNCTION pgconsistency.version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT '0.3.0'::text $fn$;

-- install_ddl: run one DDL statement of an install or upgrade with bounded
-- lock waits. install.sql runs on every deployment, while refreshes and
-- readers hold locks on pgconsistency's tables: a DDL statement that waits
-- for its lock queues every later reader behind it. So each attempt waits at
-- most 200 ms for its locks, then lets the readers through for a second and
-- tries again, until pgconsistency.install_lock_wait (default 10 s, set by
-- install.sql from psql's -v lock_wait=...) has passed; then the install
-- fails, rolled back whole, with a message that says to re-run it.
-- Internal to the installer and define_invariant. Callers run it only when
-- the catalog says the change is needed, so an unchanged install takes no
-- lock that can wait.
CREATE OR REPLACE FUNCTION pgconsistency.install_ddl(ddl text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_budget   interval := coalesce(NULLIF(pg_catalog.current_setting('pgconsistency.install_lock_wait', true), ''), '10 s')::interval;
    v_deadline timestamptz := pg_catalog.clock_timestamp() + v_budget;
    v_attempts integer := 0;
    v_saved    text := pg_catalog.current_setting('lock_timeout');
BEGIN
    LOOP
        v_attempts := v_attempts + 1;
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
            EXECUTE ddl;
            PERFORM pg_catalog.set_config('lock_timeout', v_saved, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_catalog.set_config('lock_timeout', v_saved, true);
            IF pg_catalog.clock_timestamp() + interval '1 second' > v_deadline THEN
                RAISE EXCEPTION 'pgconsistency: install stopped: another session held a lock it needs for % (% attempts in %); nothing was changed',
                    pg_catalog.left(pg_catalog.regexp_replace(pg_catalog.btrim(ddl), '\s+', ' ', 'g'), 120), v_attempts, v_budget
                    USING ERRCODE = 'lock_not_available',
                          HINT = 'A refresh or a long transaction holds a lock on pgconsistency''s objects (pg_locks shows which). '
                                 'Re-run install.sql: it is safe to repeat. '
                                 'To wait longer: psql -v lock_wait=60s -f install.sql.';
            END IF;
            PERFORM pg_catalog.pg_sleep(1);
        END;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_ddl(text) IS
  'Internal: run a DDL statement of the installer with short lock waits and retries, failing with a hint to re-run';

-- install_comment: COMMENT ON a relation only when the comment differs (a
-- COMMENT takes a SHARE UPDATE EXCLUSIVE lock on its table).
CREATE OR REPLACE FUNCTION pgconsistency.install_comment(relation text, comment text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_rel regclass := pg_catalog.to_regclass(relation);
    v_kind text;
BEGIN
    IF v_rel IS NULL OR pg_catalog.obj_description(v_rel, 'pg_class') IS NOT DISTINCT FROM comment THEN
        RETURN;
    END IF;
    SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END
      INTO v_kind FROM pg_catalog.pg_class c WHERE c.oid = v_rel;
    PERFORM pgconsistency.install_ddl(pg_catalog.format('COMMENT ON %s %s IS %L', v_kind, v_rel, comment));
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_comment(text, text) IS
  'Internal: set a relation''s comment when it differs, with the installer''s bounded lock waits';

-- install_column: ALTER TABLE ... ADD COLUMN when the column is missing (an
-- upgrade); ADD COLUMN IF NOT EXISTS would take its ACCESS EXCLUSIVE lock
-- first and check afterwards.
CREATE OR REPLACE FUNCTION pgconsistency.install_column(relation text, col text, definition text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = relation::regclass AND a.attname = col AND NOT a.attisdropped) THEN
        PERFORM pgconsistency.install_ddl(pg_catalog.format('ALTER TABLE %s ADD COLUMN %I %s', relation, col, definition));
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_column(text, text, text) IS
  'Internal: add a column missing from an older install, with the installer''s bounded lock waits';

-- install_index: CREATE INDEX when no relation of that name exists
-- (CREATE INDEX IF NOT EXISTS takes its SHARE lock before it checks).
CREATE OR REPLACE FUNCTION pgconsistency.install_index(name text, ddl text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.' || pg_catalog.quote_ident(name)) IS NULL THEN
        PERFORM pgconsistency.install_ddl(ddl);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_index(text, text) IS
  'Internal: create an index missing from an older install, with the installer''s bounded lock waits';

-- An install made before 0.1.0 (the first release) cannot be upgraded in
-- place: its tables lack columns that 0.1.0 has always had.
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.anomaly') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = pg_catalog.to_regclass('pgconsistency.anomaly') AND a.attname = 'resolved_at' AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pgconsistency: the schema pgconsistency holds an install older than release 0.1.0, which install.sql cannot upgrade'
            USING HINT = 'Keep what you need (SELECT * FROM pgconsistency.status), then DROP SCHEMA pgconsistency CASCADE and run install.sql again.';
    END IF;
END
$do$;

DO $do$
BEGIN
    IF pg_catalog.obj_description((SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgconsistency'), 'pg_namespace')
       IS DISTINCT FROM 'pgconsistency: data-consistency invariants materialized as views, their refresh state and status' THEN
        COMMENT ON SCHEMA pgconsistency IS
          'pgconsistency: data-consistency invariants materialized as views, their refresh state and status';
    END IF;
END
$do$;

-- The registry: one row per invariant. The anomaly rows live in a materialized
-- view (any schema) with a text column "key" that identifies the offending
-- entity and a unique index on it, so REFRESH ... CONCURRENTLY works.
-- The view is stored by name, not as regclass: define_invariant drops and
-- re-creates views whose query changed, and the registry must survive that.
CREATE TABLE IF NOT EXISTS pgconsistency.invariant (
    name          text        PRIMARY KEY
                              CONSTRAINT invariant_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description   text        NOT NULL,
    severity      text        NOT NULL
                              CONSTRAINT invariant_severity_valid CHECK (severity IN ('critical', 'warning', 'info')),
    view_schema   text        NOT NULL,
    view_name     text        NOT NULL,
    enabled       boolean     NOT NULL DEFAULT true,
    -- CALL pgconsistency.refresh() refreshes the invariant once this long has
    -- passed since its previous refresh started (up to a tenth of it, at most
    -- 30 s, early: a schedule whose tick equals the period must not miss
    -- every other tick because of a few milliseconds of jitter).
    refresh_period    interval NOT NULL DEFAULT '30 minutes'
                               CONSTRAINT invariant_refresh_period_positive CHECK (refresh_period > interval '0'),
    -- Guardrails of one refresh. lock_timeout bounds every lock wait of the
    -- refresh; statement_timeout bounds the refresh when it runs as a statement
    -- of its own (the receiver's scheduler does that: PostgreSQL arms
    -- statement_timeout once per top-level statement, not inside a procedure).
    statement_timeout interval NOT NULL DEFAULT '30 minutes'
                               CONSTRAINT invariant_statement_timeout_positive CHECK (statement_timeout > interval '0'),
    lock_timeout      interval NOT NULL DEFAULT '30 seconds'
                               CONSTRAINT invariant_lock_timeout_positive CHECK (lock_timeout > interval '0'),
    -- Planner settings of this invariant's refresh, e.g. {"enable_hashjoin": "off"}
    -- (see valid_refresh_settings for the names allowed). Every refresh
    -- runs with max_parallel_workers_per_gather = 0 unless this says otherwise.
    settings      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- after_refresh: optional function (schema-qualified name, one text
    -- argument: the invariant's name) that refresh_invariant calls after a
    -- successful refresh, in the same transaction, e.g. to remember counters
    -- the next refresh compares with (the operations pack's deadlocks_detected).
    after_refresh text,
    -- Resolved anomalies are deleted this long after they were resolved (by
    -- the invariant's refresh), once every log consumer has read them.
    resolved_retention interval NOT NULL DEFAULT '30 days'
                                CONSTRAINT invariant_resolved_retention_positive CHECK (resolved_retention > interval '0'),
    -- md5 of the query when the view was created by define_invariant();
    -- NULL for views registered with register_invariant().
    query_md5     text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT invariant_view_unique UNIQUE (view_schema, view_name)
);
SELECT pgconsistency.install_comment('pgconsistency.invariant',
  'Registered invariants: one materialized view of violating rows each');

-- Upgrades of the registry (each a no-op, taking no lock, when the column exists).
SELECT pgconsistency.install_column('pgconsistency.invariant', 'settings', $$jsonb NOT NULL DEFAULT '{}'::jsonb$$);
SELECT pgconsistency.install_column('pgconsistency.invariant', 'after_refresh', 'text');
SELECT pgconsistency.install_column('pgconsistency.invariant', 'resolved_retention',  -- 0.2.0
  $$interval NOT NULL DEFAULT '30 days' CONSTRAINT invariant_resolved_retention_positive CHECK (resolved_retention > interval '0')$$);
-- 0.3.0: the refresh engine. query: what define_invariant() was given (the
-- framework runs it; NULL for views of register_invariant()). refresh_mode:
-- 'full' re-runs the query; 'incremental' re-checks only the keys that
-- writes touched (see set_refresh_mode), with a full refresh (a reconcile)
-- every full_refresh_period, and instead of an incremental one when more
-- than incremental_max_keys keys changed.
SELECT pgconsistency.install_column('pgconsistency.invariant', 'query', 'text');
-- relations: the relations the query reads (schema-qualified), as of define_invariant().
SELECT pgconsistency.install_column('pgconsistency.invariant', 'relations', 'text[]');
SELECT pgconsistency.install_column('pgconsistency.invariant', 'refresh_mode',
  $$text NOT NULL DEFAULT 'full' CONSTRAINT invariant_refresh_mode_valid CHECK (refresh_mode IN ('full', 'incremental'))$$);
SELECT pgconsistency.install_column('pgconsistency.invariant', 'full_refresh_period',
  $$interval NOT NULL DEFAULT '1 day' CONSTRAINT invariant_full_refresh_period_positive CHECK (full_refresh_period > interval '0')$$);
SELECT pgconsistency.install_column('pgconsistency.invariant', 'incremental_max_keys',
  $$bigint NOT NULL DEFAULT 20000 CONSTRAINT invariant_incremental_max_keys_positive CHECK (incremental_max_keys > 0)$$);

-- The settings an invariant's refresh may change: the planner's and the
-- memory of one query; never anything that outlives the refresh's
-- transaction or touches security (set_config(..., true) is transaction-local).
CREATE OR REPLACE FUNCTION pgconsistency.valid_refresh_settings(settings jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_catalog.jsonb_typeof(settings) = 'object'
       AND NOT EXISTS (
           SELECT 1 FROM pg_catalog.jsonb_each(settings - 'incremental') AS e(k, v)
            WHERE e.k !~ '^(enable_[a-z_]+|work_mem|hash_mem_multiplier|max_parallel_workers_per_gather|random_page_cost|seq_page_cost|cpu_[a-z_]+_cost|effective_cache_size|jit|temp_buffers)$'
               OR pg_catalog.jsonb_typeof(e.v) NOT IN ('string', 'number', 'boolean'))
       -- 0.3.0: "incremental": the settings of incremental re-checks, the same names
       AND (NOT settings ? 'incremental'
            OR (pg_catalog.jsonb_typeof(settings -> 'incremental') = 'object'
                AND NOT settings -> 'incremental' ? 'incremental'
                AND pgconsistency.valid_refresh_settings(settings -> 'incremental')))
$fn$;
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                    WHERE conrelid = 'pgconsistency.invariant'::regclass AND conname = 'invariant_settings_valid') THEN
        PERFORM pgconsistency.install_ddl('ALTER TABLE pgconsistency.invariant ADD CONSTRAINT invariant_settings_valid
            CHECK (pgconsistency.valid_refresh_settings(settings))');
    END IF;
END
$do$;

-- Parameters of invariants (thresholds and the like): the invariant's query
-- reads them with pgconsistency.parameter(invariant, name), so they change
-- with set_parameter() and no SQL file is edited. Each has a type its value
-- must cast to.
CREATE TABLE IF NOT EXISTS pgconsistency.invariant_parameter (
    invariant   text    NOT NULL REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    name        text    NOT NULL,
    value       text    NOT NULL,
    type        regtype NOT NULL,
    default_value text  NOT NULL,
    description text,
    PRIMARY KEY (invariant, name)
);
SELECT pgconsistency.install_comment('pgconsistency.invariant_parameter',
  'Parameters (thresholds) of invariants; change them with pgconsistency.set_parameter()');

-- Refresh state: written only by pgconsistency.refresh(), one row per invariant
-- that has been refreshed (or attempted) at least once.
CREATE TABLE IF NOT EXISTS pgconsistency.refresh_state (
    invariant                text        PRIMARY KEY
                                         REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    -- the latest attempt that ran (skips do not count as attempts)
    last_status              text        NOT NULL
                                         CONSTRAINT refresh_state_status_valid CHECK (last_status IN ('succeeded', 'failed', 'timed_out')),
    last_started_at          timestamptz NOT NULL,
    last_finished_at         timestamptz NOT NULL,
    last_duration_seconds    double precision NOT NULL,
    last_error               text,
    -- the latest successful refresh: what the snapshot holds
    refreshed_at             timestamptz,
    refresh_duration_seconds double precision,
    anomalies                bigint      NOT NULL DEFAULT 0,
    new_anomalies            bigint      NOT NULL DEFAULT 0,
    resolved_anomalies       bigint      NOT NULL DEFAULT 0,
    -- open anomalies acknowledged (not in "anomalies"), kept current by
    -- acknowledge(), unacknowledge() and the expiry in refresh()
    acknowledged_anomalies   bigint      NOT NULL DEFAULT 0,
    consecutive_failures     integer     NOT NULL DEFAULT 0,
    -- the latest refresh skipped because another one held the invariant's lock
    last_skipped_at          timestamptz,
    skips                    bigint      NOT NULL DEFAULT 0
);
SELECT pgconsistency.install_comment('pgconsistency.refresh_state',
  'Outcome of the latest refresh of each invariant; written by pgconsistency.refresh()');
-- 0.3.0: what kind the latest successful refresh was ('full', 'incremental'
-- or 'reconcile': a full refresh of an invariant in incremental mode), when
-- the latest full one (a reconcile included) started, how many keys the
-- latest incremental one re-checked, and how many anomalies the latest
-- reconcile had to correct because the incremental refreshes had missed
-- them (0 when capture works; see capture_state).
SELECT pgconsistency.install_column('pgconsistency.refresh_state', 'last_refresh_kind',
  $$text CONSTRAINT refresh_state_kind_valid CHECK (last_refresh_kind IN ('full', 'incremental', 'reconcile'))$$);
SELECT pgconsistency.install_column('pgconsistency.refresh_state', 'last_full_refresh_at', 'timestamptz');
SELECT pgconsistency.install_column('pgconsistency.refresh_state', 'rechecked_keys', 'bigint NOT NULL DEFAULT 0');
SELECT pgconsistency.install_column('pgconsistency.refresh_state', 'healed_anomalies', 'bigint NOT NULL DEFAULT 0');
SELECT pgconsistency.install_column('pgconsistency.refresh_state', 'last_healed_at', 'timestamptz');

-- The lifecycle of every anomaly, by invariant and key: first seen, last seen,
-- resolved, acknowledged. It is what tells a new anomaly from an old one
-- even when the total count stays the same. A resolved anomaly that comes
-- back is new again (new seq, new first_seen_at, acknowledgement cleared).
-- Resolved anomalies are deleted after their invariant's resolved_retention.
-- The open anomalies of an invariant are also its snapshot: details holds
-- the offending row as of the latest refresh, and the view
-- pgconsistency.<name> of define_invariant() reads it. A refresh writes
-- O(changes): rows that appear, resolve or whose details change; nothing
-- for an anomaly that simply persists. So last_seen_at is written when an
-- anomaly appears and when it is resolved (then: the end of the latest
-- refresh that still saw it); while it is open, it was last seen by its
-- invariant's latest refresh (refresh_state.refreshed_at).
-- seq orders the log records: it is taken under a lock held until commit
-- (see refresh_invariant), so seqs become visible in increasing order.
CREATE SEQUENCE IF NOT EXISTS pgconsistency.anomaly_seq;
CREATE TABLE IF NOT EXISTS pgconsistency.anomaly (
    invariant       text        NOT NULL
                                REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    key             text        NOT NULL,
    -- increases each time the anomaly appears: the order of the log records
    seq             bigint      NOT NULL,
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    resolved_at     timestamptz,
    -- the view's row (without key) when it appeared
    details         jsonb,
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_reason      text,
    ack_until       timestamptz,
    PRIMARY KEY (invariant, key)
);
SELECT pgconsistency.install_index('anomaly_open',
  'CREATE INDEX anomaly_open ON pgconsistency.anomaly (invariant) WHERE resolved_at IS NULL');
SELECT pgconsistency.install_index('anomaly_seq_idx',
  'CREATE INDEX anomaly_seq_idx ON pgconsistency.anomaly (seq)');
-- 0.2.0: the expiry of acknowledgements and the retention of resolved
-- anomalies read only the rows they change.
SELECT pgconsistency.install_index('anomaly_ack_until',
  'CREATE INDEX anomaly_ack_until ON pgconsistency.anomaly (ack_until) WHERE ack_until IS NOT NULL');
SELECT pgconsistency.install_index('anomaly_resolved',
  'CREATE INDEX anomaly_resolved ON pgconsistency.anomaly (invariant, resolved_at) WHERE resolved_at IS NOT NULL');
SELECT pgconsistency.install_comment('pgconsistency.anomaly',
  'Anomalies by invariant and key: first seen, last seen, resolved, acknowledged');

-- Where each log consumer (a receiver in a logs pipeline, by component id)
-- is in the sequence of new anomalies: each anomaly is logged once.
-- owner: the role that created the cursor; only it (or a role with the
-- privileges of pgconsistency's owner) reads and moves it. NULL for cursors
-- made before 0.2.0: the next role to use it becomes its owner.
CREATE TABLE IF NOT EXISTS pgconsistency.log_cursor (
    consumer   text        PRIMARY KEY,
    last_seq   bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    owner      text
);
SELECT pgconsistency.install_column('pgconsistency.log_cursor', 'owner', 'text');  -- 0.2.0
SELECT pgconsistency.install_comment('pgconsistency.log_cursor',
  'Last anomaly seq delivered to each log consumer');

-- Incremental refresh (0.3.0). How the rows of a table an invariant reads
-- map to the invariant's keys: an SQL expression over the changed row r,
-- giving its key (e.g. r.dataset_id::text), recorded by the capture trigger;
-- or, when the keys are found through another table (an account's
-- datasets), the expression records a value of the row (r.id::text) and a
-- lookup query turns the values into keys when the refresh runs. The lookup
-- must run then, not in the writer's transaction: there it would miss rows
-- that another transaction, not yet committed, moves to that account.
-- Given to define_invariant(keys => ...).
CREATE TABLE IF NOT EXISTS pgconsistency.invariant_key_source (
    invariant      text NOT NULL REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    relation       text NOT NULL,
    key_expression text NOT NULL,
    -- When the row's keys are found through another table: a query run by
    -- the refresh, in its own snapshot, with the values key_expression
    -- gave as $1 (text[]), returning the keys. NULL: those values are the keys.
    key_lookup     text,
    PRIMARY KEY (invariant, relation)
);
SELECT pgconsistency.install_column('pgconsistency.invariant_key_source', 'key_lookup', 'text');
SELECT pgconsistency.install_comment('pgconsistency.invariant_key_source',
  'How rows of the tables an invariant reads map to its keys (define_invariant(keys => ...))');

-- The capture: one source per (table, key expression) that an invariant in
-- incremental mode needs. The capture triggers on the table (see
-- install_capture) write the keys of the rows each statement changed into
-- captured_key, in the writer's transaction; a refresh moves them to the
-- pending keys of each invariant in incremental mode (dispatch_captured_keys),
-- and an incremental refresh re-checks its pending keys only.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_source (
    id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relation       text NOT NULL,
    key_expression text NOT NULL,
    CONSTRAINT capture_source_unique UNIQUE (relation, key_expression)
);
SELECT pgconsistency.install_comment('pgconsistency.capture_source',
  'Tables and key expressions the capture triggers record changed keys of');
-- UNLOGGED: the writers pay no WAL for the capture. A crash empties them
-- (and a promoted standby has them empty): capture_epoch, empty then too,
-- tells the next refresh, which reconciles every invariant in incremental
-- mode. No unique index: two writers of the same key never wait for each
-- other here; a refresh reads the keys deduplicated.
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.captured_key (
    source integer NOT NULL,
    key    text    NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.pending_key (
    invariant text NOT NULL,
    key       text NOT NULL
);
SELECT pgconsistency.install_index('pending_key_invariant',
  'CREATE INDEX pending_key_invariant ON pgconsistency.pending_key (invariant)');
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.capture_epoch (
    singleton  boolean     PRIMARY KEY DEFAULT true CONSTRAINT capture_epoch_one_row CHECK (singleton),
    started_at timestamptz NOT NULL
);
SELECT pgconsistency.install_comment('pgconsistency.captured_key',
  'Keys of rows changed by writers, by capture source; moved to pending_key by each refresh');
SELECT pgconsistency.install_comment('pgconsistency.pending_key',
  'Keys an invariant in incremental mode re-checks at its next refresh');
SELECT pgconsistency.install_comment('pgconsistency.capture_epoch',
  'One row while the unlogged capture tables are intact; empty after a crash or a failover');
-- What bypassed the capture (a TRUNCATE of a captured table), written by the
-- capture triggers; the next refresh turns it into a reconcile of the
-- invariants that read the table.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_gap (
    relation text        NOT NULL,
    reason   text        NOT NULL,
    at       timestamptz NOT NULL
);
SELECT pgconsistency.install_comment('pgconsistency.capture_gap',
  'Writes the capture could not record (TRUNCATE); the next refresh reconciles what they touched');
-- One row per invariant in incremental mode: since when its keys are
-- captured, and why its next refresh must be a full one (a reconcile)
-- rather than an incremental one: NULL when nothing says so.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_state (
    invariant        text        PRIMARY KEY REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    since            timestamptz NOT NULL,
    reconcile_reason text
);
SELECT pgconsistency.install_comment('pgconsistency.capture_state',
  'Invariants in incremental mode: capture start, and why the next refresh must reconcile');

-- Refresh requests, e.g. from a deploy pipeline: "refresh everything once the
-- deployment has settled". At most one request is pending; asking again
-- during the delay pushes the due time back (the deployment is not settled).
CREATE TABLE IF NOT EXISTS pgconsistency.refresh_request (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_requested_at timestamptz NOT NULL,
    requested_at timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    requests     integer     NOT NULL DEFAULT 1,
    reason       text,
    -- set by the refresh that runs it: a request runs once
    claimed_at   timestamptz
);
SELECT pgconsistency.install_index('refresh_request_one_pending',
  'CREATE UNIQUE INDEX refresh_request_one_pending ON pgconsistency.refresh_request ((true)) WHERE claimed_at IS NULL');
SELECT pgconsistency.install_comment('pgconsistency.refresh_request',
  'Requests for a refresh of every invariant after a delay; written by pgconsistency.request_refresh()');

-- request_refresh: ask for a refresh of every enabled invariant once "delay"
-- has passed without another request. For deploy pipelines and migration
-- tools: SELECT pgconsistency.request_refresh(delay => '10 minutes').
-- The pg_cron job or the receiver's scheduler runs it when due. Returns the
-- time it is due.
CREATE OR REPLACE FUNCTION pgconsistency.request_refresh(
    delay  interval DEFAULT '10 minutes',
    reason text DEFAULT NULL
) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_due timestamptz;
BEGIN
    IF delay IS NULL OR delay < interval '0' THEN
        RAISE EXCEPTION 'pgconsistency: refresh request delay must be zero or more, got %', coalesce(delay::text, 'NULL')
            USING HINT = 'Pass the time the deployment needs to settle, e.g. delay => ''10 minutes''.';
    END IF;
    INSERT INTO pgconsistency.refresh_request AS r (first_requested_at, requested_at, due_at, reason)
    VALUES (pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp() + delay, request_refresh.reason)
    ON CONFLICT ((true)) WHERE claimed_at IS NULL DO UPDATE
       SET requested_at = EXCLUDED.requested_at,
           due_at       = EXCLUDED.due_at,
           requests     = r.requests + 1,
           reason       = coalesce(EXCLUDED.reason, r.reason)
    RETURNING r.due_at INTO v_due;
    RETURN v_due;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.request_refresh(interval, text) IS
  'Request a refresh of every enabled invariant once delay has passed without a new request (after a deployment)';

-- claim_refresh_request: take the pending request if it is due, so that it
-- runs exactly once however many schedulers poll. Returns whether one was
-- claimed. Internal to refresh() and the receiver's scheduler.
CREATE OR REPLACE FUNCTION pgconsistency.claim_refresh_request()
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r pgconsistency.refresh_request%ROWTYPE;
BEGIN
    UPDATE pgconsistency.refresh_request q
       SET claimed_at = pg_catalog.clock_timestamp()
     WHERE q.claimed_at IS NULL AND q.due_at <= pg_catalog.clock_timestamp()
    RETURNING q.* INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RAISE NOTICE 'pgconsistency: running the requested refresh of every invariant (% request(s) since %, the last at %)',
        r.requests, r.first_requested_at, r.requested_at
        USING DETAIL = coalesce('reason: ' || r.reason, 'no reason given');
    RETURN true;
END
$fn$;

-- register_row: the registry row of an invariant; an unchanged registration
-- writes nothing (install.sql runs on every deploy). Internal to
-- register_invariant and define_invariant.
CREATE OR REPLACE FUNCTION pgconsistency.register_row(
    name text, view_schema text, view_name text, severity text, description text
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF register_row.severity IS NULL OR register_row.severity NOT IN ('critical', 'warning', 'info') THEN
        RAISE EXCEPTION 'pgconsistency: severity of invariant % is %, expected critical, warning or info',
            name, coalesce(register_row.severity, 'NULL');
    END IF;
    INSERT INTO pgconsistency.invariant AS i (name, description, severity, view_schema, view_name)
    VALUES (register_row.name, coalesce(register_row.description, ''), register_row.severity,
            register_row.view_schema, register_row.view_name)
    ON CONFLICT ON CONSTRAINT invariant_pkey DO UPDATE
       SET description = EXCLUDED.description,
           severity    = EXCLUDED.severity,
           view_schema = EXCLUDED.view_schema,
           view_name   = EXCLUDED.view_name
     WHERE (i.description, i.severity, i.view_schema, i.view_name)
           IS DISTINCT FROM (EXCLUDED.description, EXCLUDED.severity, EXCLUDED.view_schema, EXCLUDED.view_name);
END
$fn$;
COMMENT ON FUNCTION pgconsistency.register_row(text, text, text, text, text) IS
  'Internal: insert or update the registry row of an invariant, writing nothing when unchanged';

-- install_view: create the plain view "relation" (schema-qualified) as
-- "definition", or re-create it when its definition differs (compared
-- through a temporary view: both deparsed by PostgreSQL with every name
-- qualified) or when a materialized view of that name is there (the
-- invariant views of releases before 0.3.0). DROP takes an ACCESS
-- EXCLUSIVE lock that would queue the readers behind it on every deploy:
-- so nothing is dropped when nothing changed, and the drop waits with the
-- installer's bounded lock waits. The grants on the old relation are given
-- to the new view. Returns whether it (re-)created the view.
CREATE OR REPLACE FUNCTION pgconsistency.install_view(relation text, definition text, comment text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old  regclass := pg_catalog.to_regclass(relation);
    v_kind "char";
    v_acl  aclitem[];
    v_owner oid;
    g record;
BEGIN
    SELECT c.relkind, c.relacl, c.relowner INTO v_kind, v_acl, v_owner FROM pg_catalog.pg_class c WHERE c.oid = v_old;
    IF v_kind = 'v' THEN
        IF pg_catalog.to_regclass('pg_temp.pgconsistency_view_next') IS NOT NULL THEN
            DROP VIEW pg_temp.pgconsistency_view_next;
        END IF;
        EXECUTE 'CREATE TEMPORARY VIEW pgconsistency_view_next AS ' || definition;
        IF pg_catalog.pg_get_viewdef(v_old) = pg_catalog.pg_get_viewdef(pg_catalog.to_regclass('pg_temp.pgconsistency_view_next')) THEN
            DROP VIEW pg_temp.pgconsistency_view_next;
            PERFORM pgconsistency.install_comment(relation, comment);
            RETURN false;
        END IF;
        DROP VIEW pg_temp.pgconsistency_view_next;
    END IF;
    IF v_kind = 'v' THEN
        PERFORM pgconsistency.install_ddl(pg_catalog.format('DROP VIEW %s', v_old));
    ELSIF v_kind = 'm' THEN
        PERFORM pgconsistency.install_ddl(pg_catalog.format('DROP MATERIALIZED VIEW %s', v_old));
    ELSIF v_kind IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: % exists and is not a view (relkind %)', relation, v_kind
            USING HINT = 'Rename or drop it, or choose another name.';
    END IF;
    EXECUTE pg_catalog.format('CREATE VIEW %s AS %s', relation, definition);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', relation, comment);
    FOR g IN
        SELECT a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END AS grantee
          FROM pg_catalog.aclexplode(v_acl) a
         WHERE a.grantee <> v_owner AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER')
    LOOP
        EXECUTE pg_catalog.format('GRANT %s ON %s TO %s%s', g.privilege_type, relation, g.grantee,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_view(text, text, text) IS
  'Internal: create or re-create a view only when its definition changed, keeping its grants';

-- query_shape: what an invariant's query returns and reads, from a
-- temporary view of it (which also checks that it parses and that what it
-- reads exists): its columns but key, as "name type, ..." for
-- jsonb_to_record (NULL when key is its only column), whether it has a
-- column key of type text, and the relations it reads (schema-qualified).
DROP FUNCTION IF EXISTS pgconsistency.query_shape(text);
CREATE OR REPLACE FUNCTION pgconsistency.query_shape(query text, OUT columns text, OUT has_key boolean, OUT relations text[],
                                                     OUT key_collation text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_probe regclass;
BEGIN
    IF pg_catalog.to_regclass('pg_temp.pgconsistency_query_probe') IS NOT NULL THEN
        DROP VIEW pg_temp.pgconsistency_query_probe;
    END IF;
    EXECUTE 'CREATE TEMPORARY VIEW pgconsistency_query_probe AS ' || query;
    v_probe := pg_catalog.to_regclass('pg_temp.pgconsistency_query_probe');
    -- A column's collation, where it is not its type's (format() over
    -- names gives "C"), is kept: the view's columns are the query's.
    SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod))
                                 || CASE WHEN a.attcollation <> t.typcollation
                                         THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END, ', '
                                 ORDER BY a.attnum) FILTER (WHERE a.attname <> 'key'),
           coalesce(pg_catalog.bool_or(a.attname = 'key' AND a.atttypid = 'text'::pg_catalog.regtype), false),
           pg_catalog.min(a.attcollation::regcollation::text) FILTER (WHERE a.attname = 'key' AND a.attcollation <> t.typcollation)
      INTO columns, has_key, key_collation
      FROM pg_catalog.pg_attribute a
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = v_probe AND a.attnum > 0 AND NOT a.attisdropped;
    SELECT pg_catalog.array_agg(DISTINCT d.refobjid::regclass::text ORDER BY d.refobjid::regclass::text)
      INTO relations
      FROM pg_catalog.pg_rewrite w
      JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = w.oid
     WHERE w.ev_class = v_probe
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> v_probe;
    DROP VIEW pg_temp.pgconsistency_query_probe;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.query_shape(text) IS
  'Internal: the detail columns, key column and relations of an invariant''s query';

-- register_invariant: register an existing materialized view as an invariant.
-- Checks what REFRESH ... CONCURRENTLY needs, so a bad view fails here, at
-- install time, with a message that says what to fix, and not at 3 a.m.
CREATE OR REPLACE FUNCTION pgconsistency.register_invariant(
    name        text,
    view_schema text,
    view_name   text,
    severity    text DEFAULT 'warning',
    description text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_oid oid;
BEGIN
    SELECT c.oid INTO v_oid
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = register_invariant.view_schema
       AND c.relname = register_invariant.view_name
       AND c.relkind = 'm';
    IF v_oid IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: %.% is not a materialized view', view_schema, view_name
            USING HINT = 'Create it with CREATE MATERIALIZED VIEW, or use pgconsistency.define_invariant(name, query, ...).';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = v_oid AND a.attname = 'key' AND NOT a.attisdropped
                      AND a.atttypid = 'text'::pg_catalog.regtype) THEN
        RAISE EXCEPTION 'pgconsistency: materialized view %.% has no text column "key"', view_schema, view_name
            USING HINT = 'Select the id of the offending entity as key, e.g. dataset_id::text AS key.';
    END IF;
    -- REFRESH ... CONCURRENTLY needs a unique index on plain columns, no WHERE clause.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                    WHERE i.indrelid = v_oid AND i.indisunique AND i.indisvalid
                      AND i.indpred IS NULL AND i.indexprs IS NULL
                      AND i.indnkeyatts = 1
                      AND i.indkey[0] = (SELECT a.attnum FROM pg_catalog.pg_attribute a
                                          WHERE a.attrelid = v_oid AND a.attname = 'key')) THEN
        RAISE EXCEPTION 'pgconsistency: materialized view %.% has no unique index on (key)', view_schema, view_name
            USING HINT = pg_catalog.format('CREATE UNIQUE INDEX ON %I.%I (key); REFRESH ... CONCURRENTLY needs it.',
                                           view_schema, view_name);
    END IF;
    IF register_invariant.severity IS NULL OR register_invariant.severity NOT IN ('critical', 'warning', 'info') THEN
        RAISE EXCEPTION 'pgconsistency: severity of invariant % is %, expected critical, warning or info',
            name, coalesce(register_invariant.severity, 'NULL');
    END IF;

    PERFORM pgconsistency.register_row(name, view_schema, view_name, severity, description);
END
$fn$;
COMMENT ON FUNCTION pgconsistency.register_invariant(text, text, text, text, text) IS
  'Register (or update) an invariant whose anomalies are held by an existing materialized view';

-- define_invariant: create the materialized view pgconsistency.<name> from a
-- query (columns: key text NOT NULL, then any details) and register it.
-- Re-running with the same query is a no-op for the view; a changed query
-- replaces the view (created WITH NO DATA: nothing scans at install time).
-- The query must schema-qualify every table and keep volatile values such
-- as now() out of its output columns (comparing with now() in WHERE is fine):
-- REFRESH ... CONCURRENTLY diffs whole rows.
-- apply_refresh_settings: the settings a refresh runs with, for the rest of
-- the current transaction. One core per refresh (parallel workers made the
-- refreshes of make bench 2x slower on 2 cores and take CPU from the
-- application), then the invariant's own planner settings. No SET clause:
-- it would undo these settings when the function returns.
CREATE OR REPLACE FUNCTION pgconsistency.apply_refresh_settings(settings jsonb) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_catalog.set_config('max_parallel_workers_per_gather', '0', true);
    PERFORM pg_catalog.set_config(e.key, e.value, true) FROM pg_catalog.jsonb_each_text(settings - 'incremental') AS e;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.apply_refresh_settings(jsonb) IS
  'Internal: set the planner settings of a refresh (and of EXPLAINs of it) for the current transaction';

-- parameter: the value of an invariant's parameter, for its query, e.g.
-- (SELECT pgconsistency.parameter('transaction_long_running', 'threshold')::interval).
-- NULL when the parameter does not exist (the query's cast then fails the
-- refresh with a message naming the invariant).
CREATE OR REPLACE FUNCTION pgconsistency.parameter(invariant text, name text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT p.value FROM pgconsistency.invariant_parameter p
     WHERE p.invariant = parameter.invariant AND p.name = parameter.name
$fn$;

-- define_parameter: declare a parameter of an invariant with its type and
-- default. Re-running keeps a value changed with set_parameter().
CREATE OR REPLACE FUNCTION pgconsistency.define_parameter(
    invariant     text,
    name          text,
    type          regtype,
    default_value text,
    description   text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = define_parameter.invariant) THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'Define the invariant first.';
    END IF;
    EXECUTE pg_catalog.format('SELECT %L::%s', default_value, type); -- raises if it does not cast
    INSERT INTO pgconsistency.invariant_parameter AS p (invariant, name, value, type, default_value, description)
    VALUES (define_parameter.invariant, define_parameter.name, default_value, type, default_value, description)
    ON CONFLICT ON CONSTRAINT invariant_parameter_pkey DO UPDATE
       SET type = EXCLUDED.type, default_value = EXCLUDED.default_value, description = EXCLUDED.description;
END
$fn$;

-- set_parameter: change a parameter; the value must cast to its type. It
-- applies from the invariant's next refresh.
CREATE OR REPLACE FUNCTION pgconsistency.set_parameter(invariant text, name text, value text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_type regtype;
BEGIN
    SELECT p.type INTO v_type FROM pgconsistency.invariant_parameter p
     WHERE p.invariant = set_parameter.invariant AND p.name = set_parameter.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: invariant % has no parameter %', pg_catalog.quote_literal(invariant), pg_catalog.quote_literal(name)
            USING HINT = coalesce('Its parameters: ' || (SELECT pg_catalog.string_agg(p.name, ', ' ORDER BY p.name)
                                                           FROM pgconsistency.invariant_parameter p
                                                          WHERE p.invariant = set_parameter.invariant),
                                  'It has none.');
    END IF;
    BEGIN
        EXECUTE pg_catalog.format('SELECT %L::%s', value, v_type);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'pgconsistency: % is not a valid % for parameter % of invariant %',
            pg_catalog.quote_literal(value), v_type, name, invariant
            USING HINT = 'Examples: ''1 hour'' for an interval, 80 for a numeric.';
    END;
    UPDATE pgconsistency.invariant_parameter p SET value = set_parameter.value
     WHERE p.invariant = set_parameter.invariant AND p.name = set_parameter.name;
END
$fn$;

-- anomaly_view_sql: the definition of the view pgconsistency.<invariant>:
-- its open anomalies with the columns of its query (columns and
-- key_collation as query_shape gives them).
CREATE OR REPLACE FUNCTION pgconsistency.anomaly_view_sql(invariant text, columns text, key_collation text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'SELECT a.key' || coalesce(' COLLATE ' || key_collation || ' AS key', '')
        || CASE WHEN columns IS NULL THEN '' ELSE ', d.*' END
        || ' FROM pgconsistency.anomaly a'
        || CASE WHEN columns IS NULL THEN ''
                ELSE ' CROSS JOIN LATERAL pg_catalog.jsonb_to_record(a.details) AS d(' || columns || ')' END
        || pg_catalog.format(' WHERE a.invariant = %L AND a.resolved_at IS NULL', invariant)
$fn$;
COMMENT ON FUNCTION pgconsistency.anomaly_view_sql(text, text, text) IS
  'Internal: the definition of the view of an invariant''s open anomalies';

-- copy_snapshot: the rows of the populated materialized view
-- pgconsistency.<invariant> of a release before 0.3.0 into the details of
-- the invariant's open anomalies, before define_invariant replaces the view
-- (those releases wrote details only when an anomaly appeared).
CREATE OR REPLACE FUNCTION pgconsistency.copy_snapshot(invariant text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                WHERE c.oid = pg_catalog.to_regclass(pg_catalog.format('pgconsistency.%I', invariant))
                  AND c.relkind = 'm' AND c.relispopulated) THEN
        EXECUTE pg_catalog.format($q$
            UPDATE pgconsistency.anomaly a SET details = pg_catalog.to_jsonb(v) - 'key'
              FROM pgconsistency.%I v
             WHERE a.invariant = $1 AND a.key = v.key AND a.resolved_at IS NULL
               AND a.details IS DISTINCT FROM pg_catalog.to_jsonb(v) - 'key'$q$, invariant)
        USING invariant;
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.copy_snapshot(text) IS
  'Internal (upgrades from before 0.3.0): copy a materialized view''s rows into the details of its open anomalies';

-- upgrade_defined_views: the invariants an older release made with
-- define_invariant whose definition nobody ran again since the upgrade (a
-- user's own, say): their materialized views become the views of 0.3.0,
-- from the view's definition as PostgreSQL keeps it. query_md5 stays that
-- of the original text, so running the original define_invariant again
-- changes nothing but the text kept. install.sql runs it after the packs.
CREATE OR REPLACE FUNCTION pgconsistency.upgrade_defined_views() RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    i record;
    v_query text;
    v_shape record;
BEGIN
    FOR i IN
        SELECT r.name, r.severity, r.description
          FROM pgconsistency.invariant r
          JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(pg_catalog.format('pgconsistency.%I', r.name))
         WHERE r.query IS NULL AND r.query_md5 IS NOT NULL AND r.view_schema = 'pgconsistency' AND r.view_name = r.name
           AND c.relkind = 'm'
         ORDER BY r.name
    LOOP
        v_query := pg_catalog.rtrim(pg_catalog.btrim(pg_catalog.pg_get_viewdef(pg_catalog.format('pgconsistency.%I', i.name)::regclass)), ';');
        v_shape := pgconsistency.query_shape(v_query);
        PERFORM pgconsistency.copy_snapshot(i.name);
        PERFORM pgconsistency.install_view(pg_catalog.format('pgconsistency.%I', i.name),
            pgconsistency.anomaly_view_sql(i.name, v_shape.columns, v_shape.key_collation),
            'pgconsistency invariant ' || i.name || ': ' || coalesce(i.description, '') || ' (its open anomalies as of the latest refresh)');
        UPDATE pgconsistency.invariant r SET query = v_query, relations = v_shape.relations WHERE r.name = i.name;
        RETURN NEXT i.name;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.upgrade_defined_views() IS
  'Internal (upgrades from before 0.3.0): turn the remaining materialized views of define_invariant into 0.3.0 views';

-- define_invariant: register an invariant from its query: columns key
-- (text, NOT NULL, once per offending entity) and any details. The
-- framework runs the query on each refresh and keeps its rows as the open
-- anomalies of the invariant (pgconsistency.anomaly); the view
-- pgconsistency.<name> shows them with the query's columns. Re-running with
-- the same arguments changes nothing and takes no lock that waits. The
-- query must schema-qualify every table and keep volatile values such as
-- now() out of its output columns (comparing with now() in WHERE is fine):
-- each refresh compares whole rows.
-- settings, when given, are the refresh settings (see the invariant table)
-- of a new invariant, or of one whose query changed; otherwise the settings
-- a DBA may have changed since (UPDATE pgconsistency.invariant SET settings)
-- are kept. NULL keeps them as they are.
-- keys says, for incremental refresh (set_refresh_mode), how the rows of
-- each table the query reads map to its keys: a JSON object from table to
-- an SQL expression over the changed row r, e.g.
--   {"public.orders": "r.customer_id::text", "public.customers": "r.id::text"}
-- or, where the keys are found through another table, to
--   {"capture": "r.id::text", "keys": "SELECT c.id::text FROM public.customers c WHERE c.account_id = ANY ($1)"}
-- (the refresh runs the lookup with the captured values as $1). NULL
-- keeps the mapping given before.
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text);
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text, jsonb);
CREATE OR REPLACE FUNCTION pgconsistency.define_invariant(
    name        text,
    query       text,
    severity    text DEFAULT 'warning',
    description text DEFAULT NULL,
    settings    jsonb DEFAULT NULL,
    keys        jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_md5     text := pg_catalog.md5(query);
    v_shape   record;
    v_kind    "char";
    v_view    text;
    v_keys    jsonb;
    v_old     jsonb;
    v_changed boolean;
    e record;
BEGIN
    IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'pgconsistency: invalid invariant name %', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING HINT = 'Use lower-case letters, digits and underscores, starting with a letter (at most 63 characters).';
    END IF;
    SELECT c.relkind INTO v_kind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pgconsistency' AND c.relname = define_invariant.name;
    IF v_kind IS NOT NULL AND (v_kind NOT IN ('v', 'm') OR NOT EXISTS (
           SELECT 1 FROM pgconsistency.invariant i
            WHERE i.name = define_invariant.name AND i.view_schema = 'pgconsistency' AND i.view_name = define_invariant.name)) THEN
        RAISE EXCEPTION 'pgconsistency: invariant name % collides with pgconsistency.% (relkind %)', name, name, v_kind
            USING HINT = 'Choose another name.';
    END IF;

    v_shape := pgconsistency.query_shape(query);
    IF NOT v_shape.has_key THEN
        RAISE EXCEPTION 'pgconsistency: the query of invariant % has no text column "key"', name
            USING HINT = 'Select the id of the offending entity as key, e.g. dataset_id::text AS key.';
    END IF;

    -- The view of its anomalies, with the query's columns.
    v_view := pgconsistency.anomaly_view_sql(name, v_shape.columns, v_shape.key_collation);
    IF v_kind = 'm' THEN
        -- The materialized view of a release before 0.3.0: its rows are
        -- the latest snapshot, the open anomalies' details only what each
        -- was when it appeared. The view that replaces it shows details.
        PERFORM pgconsistency.copy_snapshot(name);
    END IF;
    PERFORM pgconsistency.install_view(pg_catalog.format('pgconsistency.%I', name), v_view,
                                       'pgconsistency invariant ' || name || ': ' || coalesce(description, '')
                                       || ' (its open anomalies as of the latest refresh)');

    PERFORM pgconsistency.register_row(name, 'pgconsistency', name, severity, description);
    -- settings are those of a new invariant or of a changed query; re-running
    -- a pack keeps what a DBA changed since.
    UPDATE pgconsistency.invariant i
       SET query_md5 = v_md5,
           query = define_invariant.query,
           relations = v_shape.relations,
           settings = CASE WHEN i.query_md5 IS DISTINCT FROM v_md5 THEN coalesce(define_invariant.settings, i.settings)
                           -- an upgrade to 0.3.0 adds the incremental settings a pack ships
                           WHEN NOT i.settings ? 'incremental' AND define_invariant.settings ? 'incremental'
                           THEN i.settings || pg_catalog.jsonb_build_object('incremental', define_invariant.settings -> 'incremental')
                           ELSE i.settings END
     WHERE i.name = define_invariant.name
       AND (i.query_md5 IS DISTINCT FROM v_md5 OR i.query IS DISTINCT FROM define_invariant.query
            OR i.relations IS DISTINCT FROM v_shape.relations
            OR (NOT i.settings ? 'incremental' AND define_invariant.settings ? 'incremental'));
    v_changed := FOUND;

    IF keys IS NOT NULL THEN
        IF pg_catalog.jsonb_typeof(keys) <> 'object' THEN
            RAISE EXCEPTION 'pgconsistency: keys of invariant % must be a JSON object from table to key expression', name
                USING HINT = 'e.g. keys => ''{"public.orders": "r.customer_id::text"}''';
        END IF;
        v_keys := '{}';
        FOR e IN SELECT k.key AS relation, k.value,
                        CASE pg_catalog.jsonb_typeof(k.value) WHEN 'string' THEN k.value #>> '{}' ELSE k.value ->> 'capture' END AS capture,
                        CASE pg_catalog.jsonb_typeof(k.value) WHEN 'object' THEN k.value ->> 'keys' END AS lookup
                   FROM pg_catalog.jsonb_each(keys) k LOOP
            IF pg_catalog.to_regclass(e.relation) IS NULL OR e.capture IS NULL
               OR (pg_catalog.jsonb_typeof(e.value) = 'object' AND (e.lookup IS NULL OR (SELECT count(*) FROM pg_catalog.jsonb_object_keys(e.value)) <> 2)) THEN
                RAISE EXCEPTION 'pgconsistency: keys of invariant %: % is not a table, or its mapping is neither a key expression nor {"capture": ..., "keys": ...}', name, e.relation
                    USING HINT = 'e.g. keys => ''{"public.orders": "r.customer_id::text", "public.accounts": {"capture": "r.id::text", "keys": "SELECT o.customer_id::text FROM public.customers o WHERE o.account_id = ANY ($1)"}}''';
            END IF;
            IF NOT pg_catalog.to_regclass(e.relation)::text = ANY (coalesce(v_shape.relations, '{}')) THEN
                RAISE EXCEPTION 'pgconsistency: keys of invariant %: its query does not read %', name, e.relation
                    USING HINT = pg_catalog.format('It reads: %s.', coalesce(pg_catalog.array_to_string(v_shape.relations, ', '), 'nothing'));
            END IF;
            BEGIN
                EXECUTE pg_catalog.format('SELECT (%s)::text FROM %s r LIMIT 0', e.capture, pg_catalog.to_regclass(e.relation));
                IF e.lookup IS NOT NULL THEN
                    EXECUTE pg_catalog.format('SELECT l.key FROM (%s) AS l(key) LIMIT 0', e.lookup) USING '{}'::text[];
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION 'pgconsistency: keys of invariant %: the mapping of % does not work: %', name, e.relation, SQLERRM
                    USING HINT = 'An expression over the changed row r, e.g. r.id::text; a lookup query reads the values as $1 (text[]) and returns one text column.';
            END;
            v_keys := v_keys || pg_catalog.jsonb_build_object(pg_catalog.to_regclass(e.relation)::text,
                CASE WHEN e.lookup IS NULL THEN pg_catalog.to_jsonb(e.capture)
                     ELSE pg_catalog.jsonb_build_object('capture', e.capture, 'keys', e.lookup) END);
        END LOOP;
        SELECT coalesce(pg_catalog.jsonb_object_agg(s.relation,
                   CASE WHEN s.key_lookup IS NULL THEN pg_catalog.to_jsonb(s.key_expression)
                        ELSE pg_catalog.jsonb_build_object('capture', s.key_expression, 'keys', s.key_lookup) END), '{}')
          INTO v_old
          FROM pgconsistency.invariant_key_source s WHERE s.invariant = define_invariant.name;
        IF v_old IS DISTINCT FROM v_keys THEN
            DELETE FROM pgconsistency.invariant_key_source s WHERE s.invariant = define_invariant.name;
            INSERT INTO pgconsistency.invariant_key_source (invariant, relation, key_expression, key_lookup)
            SELECT define_invariant.name, k.key,
                   CASE pg_catalog.jsonb_typeof(k.value) WHEN 'string' THEN k.value #>> '{}' ELSE k.value ->> 'capture' END,
                   CASE pg_catalog.jsonb_typeof(k.value) WHEN 'object' THEN k.value ->> 'keys' END
              FROM pg_catalog.jsonb_each(v_keys) k;
            v_changed := true;
        END IF;
    END IF;

    -- An invariant in incremental mode whose query or keys changed: its
    -- capture follows, and its next refresh is a full one.
    IF v_changed AND EXISTS (SELECT 1 FROM pgconsistency.invariant i
                              WHERE i.name = define_invariant.name AND i.refresh_mode = 'incremental') THEN
        PERFORM pgconsistency.check_incremental(name);
        UPDATE pgconsistency.capture_state c
           SET reconcile_reason = coalesce(c.reconcile_reason, pgconsistency.reconcile_reason_changed())
         WHERE c.invariant = define_invariant.name;
        PERFORM pgconsistency.install_capture();
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.define_invariant(text, text, text, text, jsonb, jsonb) IS
  'Create or update an invariant from its query (and, for incremental refresh, how rows of its tables map to its keys)';

-- The reasons for a reconcile that expects differences: the capture did not
-- cover the snapshot yet, or the query changed.
CREATE OR REPLACE FUNCTION pgconsistency.reconcile_reason_started() RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$ SELECT 'incremental mode just started'::text $fn$;
CREATE OR REPLACE FUNCTION pgconsistency.reconcile_reason_changed() RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$ SELECT 'its query or key mapping changed'::text $fn$;

-- check_incremental: raise unless the invariant can be refreshed
-- incrementally: it was made by define_invariant, and every relation its
-- query reads is a table with a key mapping (define_invariant(keys => ...)).
CREATE OR REPLACE FUNCTION pgconsistency.check_incremental(invariant text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_query    text;
    v_rels     text[];
    v_unmapped text[];
    v_nottable text[];
BEGIN
    SELECT i.query, i.relations INTO v_query, v_rels FROM pgconsistency.invariant i WHERE i.name = check_incremental.invariant;
    IF v_query IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: invariant % cannot be refreshed incrementally: it is a materialized view of register_invariant()', invariant
            USING HINT = 'Define it with pgconsistency.define_invariant(name, query, keys => ...) instead.';
    END IF;
    SELECT pg_catalog.array_agg(r ORDER BY r) FILTER (WHERE c.relkind NOT IN ('r', 'p')),
           pg_catalog.array_agg(r ORDER BY r) FILTER (WHERE c.relkind IN ('r', 'p') AND NOT EXISTS (
               SELECT 1 FROM pgconsistency.invariant_key_source s
                WHERE s.invariant = check_incremental.invariant AND s.relation = r))
      INTO v_nottable, v_unmapped
      FROM pg_catalog.unnest(coalesce(v_rels, '{}')) AS r
      JOIN pg_catalog.pg_class c ON c.oid = r::regclass;
    IF v_nottable IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: invariant % cannot be refreshed incrementally: it reads %, which % not a table (writes to it cannot be captured)',
            invariant, pg_catalog.array_to_string(v_nottable, ', '), CASE WHEN pg_catalog.cardinality(v_nottable) = 1 THEN 'is' ELSE 'are' END
            USING HINT = 'Keep it in full mode, or read the tables behind the view in its query.';
    END IF;
    IF v_unmapped IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: invariant % cannot be refreshed incrementally: no key mapping for %', invariant,
            pg_catalog.array_to_string(v_unmapped, ', ')
            USING HINT = pg_catalog.format('Say how their rows map to the invariant''s keys: pgconsistency.define_invariant(%L, <query>, keys => ''{"%s": "r.<column>::text"}'').',
                                           invariant, v_unmapped[1]);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.check_incremental(text) IS
  'Internal: raise unless an invariant''s query and key mapping allow incremental refresh';

-- install_capture: make the capture triggers match the invariants in
-- incremental mode. For each table one of them reads: a function
-- pgconsistency.capture_<table oid> (replaced only when its text changes:
-- that takes no lock on the table) and four statement-level triggers, AFTER
-- INSERT, UPDATE and DELETE with transition tables, which write the keys of
-- the changed rows to captured_key once per statement, and AFTER TRUNCATE,
-- which records a gap. The triggers are ENABLE ALWAYS: writes under
-- session_replication_role = replica (logical replication, some restores)
-- are captured too. Creating or dropping a trigger locks its table against
-- writes: each waits at most 200 ms at a time (install_ddl), and only when
-- one is missing, disabled or no longer needed.
CREATE OR REPLACE FUNCTION pgconsistency.install_capture() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t       record;
    v_fn    text;
    v_body  text;
    v_rows  text;
    v_trig  record;
BEGIN
    INSERT INTO pgconsistency.capture_source (relation, key_expression)
    SELECT DISTINCT s.relation, s.key_expression
      FROM pgconsistency.invariant_key_source s
      JOIN pgconsistency.invariant i ON i.name = s.invariant AND i.refresh_mode = 'incremental'
     WHERE NOT EXISTS (SELECT 1 FROM pgconsistency.capture_source c
                        WHERE c.relation = s.relation AND c.key_expression = s.key_expression);

    DELETE FROM pgconsistency.capture_source c
     WHERE NOT EXISTS (SELECT 1 FROM pgconsistency.invariant_key_source s
                        WHERE s.relation = c.relation AND s.key_expression = c.key_expression);

    FOR t IN
        WITH needed AS (
            SELECT c.relation::regclass AS rel, c.id, c.key_expression
              FROM pgconsistency.capture_source c
             WHERE pg_catalog.to_regclass(c.relation) IS NOT NULL
               AND EXISTS (SELECT 1 FROM pgconsistency.invariant_key_source s
                             JOIN pgconsistency.invariant i ON i.name = s.invariant AND i.refresh_mode = 'incremental'
                            WHERE s.relation = c.relation AND s.key_expression = c.key_expression)),
        present AS (
            SELECT DISTINCT g.tgrelid::regclass AS rel
              FROM pg_catalog.pg_trigger g
             WHERE g.tgname LIKE 'pgconsistency\_capture\_%' AND NOT g.tgisinternal)
        SELECT r.rel, pg_catalog.array_agg(n.id ORDER BY n.id) FILTER (WHERE n.id IS NOT NULL) AS ids,
               pg_catalog.array_agg(n.key_expression ORDER BY n.id) FILTER (WHERE n.id IS NOT NULL) AS exprs
          FROM (SELECT rel FROM needed UNION SELECT rel FROM present) r
          LEFT JOIN needed n ON n.rel = r.rel
         GROUP BY r.rel
    LOOP
        v_fn := pg_catalog.format('pgconsistency.capture_%s', t.rel::oid);
        IF t.ids IS NULL THEN
            -- No invariant in incremental mode reads it any more.
            FOR v_trig IN SELECT g.tgname FROM pg_catalog.pg_trigger g
                           WHERE g.tgrelid = t.rel AND g.tgname LIKE 'pgconsistency\_capture\_%' AND NOT g.tgisinternal LOOP
                PERFORM pgconsistency.install_ddl(pg_catalog.format('DROP TRIGGER %I ON %s', v_trig.tgname, t.rel));
            END LOOP;
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s()', v_fn);
            CONTINUE;
        END IF;
        -- rows: the changed rows as r (a transition table), keyed by source.
        SELECT pg_catalog.string_agg(pg_catalog.format('SELECT %s AS source, (%s)::text AS key FROM __pgconsistency_rows__ r', x.id, x.expr),
                                     ' UNION ALL ' ORDER BY x.id)
          INTO v_rows
          FROM ROWS FROM (pg_catalog.unnest(t.ids), pg_catalog.unnest(t.exprs)) AS x(id, expr);
        v_body := pg_catalog.format($b$
-- Generated by pgconsistency.install_capture() for %1$s: do not edit.
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%2$s) c WHERE c.key IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%3$s) c WHERE c.key IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%2$s UNION ALL %3$s) c WHERE c.key IS NOT NULL;
    ELSE
        INSERT INTO pgconsistency.capture_gap (relation, reason, at)
        VALUES (%4$L, 'TRUNCATE ' || %4$L, pg_catalog.clock_timestamp());
    END IF;
    RETURN NULL;
END
$b$, t.rel, pg_catalog.replace(v_rows, ' FROM __pgconsistency_rows__ r', ' FROM new_rows r'),
            pg_catalog.replace(v_rows, ' FROM __pgconsistency_rows__ r', ' FROM old_rows r'), t.rel::text);
        IF pg_catalog.to_regprocedure(v_fn || '()') IS NULL
           OR (SELECT p.prosrc FROM pg_catalog.pg_proc p WHERE p.oid = pg_catalog.to_regprocedure(v_fn || '()')) IS DISTINCT FROM v_body THEN
            -- SECURITY DEFINER: the application's roles write the keys
            -- without any privilege on pgconsistency's tables.
            EXECUTE pg_catalog.format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                                      'SET search_path = pg_catalog, pg_temp AS %L', v_fn, v_body);
            EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', v_fn);
            EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s() IS %L', v_fn,
                                      'pgconsistency: capture of the keys of rows changed in ' || t.rel::text || ' (generated)');
        END IF;
        FOR v_trig IN
            SELECT w.name, w.ddl, g.tgenabled
              FROM (VALUES
                    ('pgconsistency_capture_insert', 'AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows'),
                    ('pgconsistency_capture_update', 'AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
                    ('pgconsistency_capture_delete', 'AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows'),
                    ('pgconsistency_capture_truncate', 'AFTER TRUNCATE ON %s')) AS w(name, ddl)
              LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = t.rel AND g.tgname = w.name AND NOT g.tgisinternal
        LOOP
            IF v_trig.tgenabled IS NULL THEN
                PERFORM pgconsistency.install_ddl(pg_catalog.format('CREATE TRIGGER %I ' || v_trig.ddl || ' FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                                                                    v_trig.name, t.rel, v_fn));
            END IF;
            IF v_trig.tgenabled IS DISTINCT FROM 'A' THEN
                PERFORM pgconsistency.install_ddl(pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel, v_trig.name));
            END IF;
        END LOOP;
    END LOOP;
    -- The functions of tables dropped since (a migration that re-created a
    -- table gives it a new oid, and a new function).
    FOR v_trig IN
        SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.proname ~ '^capture_[0-9]+$'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgfoid = p.oid)
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', v_trig.fn);
    END LOOP;
    INSERT INTO pgconsistency.capture_epoch (started_at) VALUES (pg_catalog.clock_timestamp())
    ON CONFLICT ON CONSTRAINT capture_epoch_pkey DO NOTHING;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.install_capture() IS
  'Internal: create, update or drop the capture triggers to match the invariants in incremental mode';

-- set_refresh_mode: 'incremental' re-checks, on each refresh, only the keys
-- of the rows written since the previous one (captured by triggers in the
-- writers' transactions; see install_capture), with a full refresh that
-- reconciles every full_refresh_period (default 1 day) and whenever the
-- capture may have missed a write. 'full' (the default) re-runs the whole
-- query on each refresh. The invariant's first refresh after a switch to
-- incremental is a full one.
--   SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental');
-- Returns the mode before.
CREATE OR REPLACE FUNCTION pgconsistency.set_refresh_mode(invariant text, mode text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old text;
BEGIN
    SELECT i.refresh_mode INTO v_old FROM pgconsistency.invariant i WHERE i.name = set_refresh_mode.invariant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    IF mode IS NULL OR mode NOT IN ('full', 'incremental') THEN
        RAISE EXCEPTION 'pgconsistency: refresh mode must be ''full'' or ''incremental'', got %', coalesce(pg_catalog.quote_literal(mode), 'NULL');
    END IF;
    IF mode = 'incremental' THEN
        PERFORM pgconsistency.check_incremental(invariant);
        INSERT INTO pgconsistency.capture_state (invariant, since, reconcile_reason)
        VALUES (invariant, pg_catalog.clock_timestamp(), pgconsistency.reconcile_reason_started())
        ON CONFLICT ON CONSTRAINT capture_state_pkey DO NOTHING;
    ELSE
        DELETE FROM pgconsistency.capture_state c WHERE c.invariant = set_refresh_mode.invariant;
        DELETE FROM pgconsistency.pending_key p WHERE p.invariant = set_refresh_mode.invariant;
    END IF;
    UPDATE pgconsistency.invariant i SET refresh_mode = set_refresh_mode.mode
     WHERE i.name = set_refresh_mode.invariant AND i.refresh_mode IS DISTINCT FROM set_refresh_mode.mode;
    PERFORM pgconsistency.install_capture();
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.refresh_mode = 'incremental') THEN
        DELETE FROM pgconsistency.captured_key; -- no trigger writes there any more, no refresh would move them
    END IF;
    RETURN v_old;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.set_refresh_mode(text, text) IS
  'Refresh an invariant incrementally (only the keys writes touched, reconciled by a full refresh every full_refresh_period) or fully';

-- dispatch_captured_keys: move the captured keys to the pending keys of
-- each invariant in incremental mode that they concern; turn capture gaps
-- (TRUNCATE) and a lost capture (crash, failover: the unlogged tables are
-- empty) into reconciles. The keys a writer committed before this
-- statement are moved; later ones stay for the next refresh, which then
-- sees their rows. One session at a time; another one skips (the keys wait
-- for the next refresh). Internal to refresh_invariant.
CREATE OR REPLACE FUNCTION pgconsistency.dispatch_captured_keys() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    l record;
BEGIN
    -- Every refresh of an invariant in incremental mode calls this; the
    -- first one of a round moves everything, the others find nothing.
    IF EXISTS (SELECT 1 FROM pgconsistency.capture_epoch)
       AND NOT EXISTS (SELECT 1 FROM pgconsistency.captured_key)
       AND NOT EXISTS (SELECT 1 FROM pgconsistency.capture_gap) THEN
        RETURN;
    END IF;
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.capture'), 0) THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.capture_epoch) THEN
        INSERT INTO pgconsistency.capture_epoch (started_at) VALUES (pg_catalog.clock_timestamp())
        ON CONFLICT ON CONSTRAINT capture_epoch_pkey DO NOTHING;
        UPDATE pgconsistency.capture_state c
           SET reconcile_reason = coalesce(c.reconcile_reason,
               'the captured keys were lost (a restart after a crash, or a promoted standby: the capture tables are unlogged)');
    END IF;
    WITH gap AS (
        DELETE FROM pgconsistency.capture_gap g RETURNING g.relation, g.reason),
    hit AS (
        SELECT s.invariant, pg_catalog.min(gap.reason) AS reason
          FROM gap JOIN pgconsistency.invariant_key_source s ON s.relation = gap.relation
         GROUP BY s.invariant)
    UPDATE pgconsistency.capture_state c
       SET reconcile_reason = coalesce(c.reconcile_reason, hit.reason || ' bypassed the capture')
      FROM hit WHERE c.invariant = hit.invariant;
    IF pg_catalog.to_regclass('pg_temp.pgconsistency_moved') IS NULL THEN
        CREATE TEMPORARY TABLE pgconsistency_moved (source integer, key text) ON COMMIT DELETE ROWS;
    ELSE
        DELETE FROM pg_temp.pgconsistency_moved;
    END IF;
    WITH moved AS (
        DELETE FROM pgconsistency.captured_key k RETURNING k.source, k.key)
    INSERT INTO pg_temp.pgconsistency_moved SELECT moved.source, moved.key FROM moved;
    INSERT INTO pgconsistency.pending_key (invariant, key)
    SELECT DISTINCT s.invariant, m.key
      FROM pg_temp.pgconsistency_moved m
      JOIN pgconsistency.capture_source c ON c.id = m.source
      JOIN pgconsistency.invariant_key_source s ON s.relation = c.relation AND s.key_expression = c.key_expression
      JOIN pgconsistency.capture_state cs ON cs.invariant = s.invariant
     WHERE s.key_lookup IS NULL;
    -- Keys found through another table, looked up now, in this snapshot.
    FOR l IN
        SELECT s.invariant, s.key_lookup, pg_catalog.array_agg(DISTINCT m.key) AS vals
          FROM pg_temp.pgconsistency_moved m
          JOIN pgconsistency.capture_source c ON c.id = m.source
          JOIN pgconsistency.invariant_key_source s ON s.relation = c.relation AND s.key_expression = c.key_expression
          JOIN pgconsistency.capture_state cs ON cs.invariant = s.invariant
         WHERE s.key_lookup IS NOT NULL
         GROUP BY s.invariant, s.key_lookup
    LOOP
        EXECUTE pg_catalog.format('INSERT INTO pgconsistency.pending_key (invariant, key)
                                   SELECT DISTINCT %L, l.key FROM (%s) AS l(key) WHERE l.key IS NOT NULL', l.invariant, l.key_lookup)
            USING l.vals;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.dispatch_captured_keys() IS
  'Internal: move captured keys to the pending keys of the invariants in incremental mode';

-- reconcile_reason: why the next refresh of an invariant in incremental
-- mode must be a full one, or NULL: a reason recorded in capture_state, a
-- capture trigger missing or not ENABLE ALWAYS on a table it reads, or
-- full_refresh_period passed since the latest full refresh.
CREATE OR REPLACE FUNCTION pgconsistency.reconcile_reason(invariant text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_reason text;
    v_found  boolean;
BEGIN
    SELECT c.reconcile_reason, true INTO v_reason, v_found FROM pgconsistency.capture_state c WHERE c.invariant = reconcile_reason.invariant;
    IF v_found IS NULL THEN
        RETURN 'it has no capture state (run set_refresh_mode again)';
    END IF;
    IF v_reason IS NOT NULL THEN
        RETURN v_reason;
    END IF;
    SELECT pg_catalog.format('capture trigger %s on %s is %s', w.name, s.relation,
                             CASE WHEN pg_catalog.to_regclass(s.relation) IS NULL THEN 'gone with its table'
                                  WHEN g.tgenabled IS NULL THEN 'missing' ELSE 'not ENABLE ALWAYS' END)
      INTO v_reason
      FROM pgconsistency.invariant_key_source s
     CROSS JOIN (VALUES ('pgconsistency_capture_insert'), ('pgconsistency_capture_update'),
                        ('pgconsistency_capture_delete'), ('pgconsistency_capture_truncate')) AS w(name)
      LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = pg_catalog.to_regclass(s.relation) AND g.tgname = w.name
     WHERE s.invariant = reconcile_reason.invariant AND g.tgenabled IS DISTINCT FROM 'A'
     ORDER BY s.relation, w.name
     LIMIT 1;
    IF v_reason IS NOT NULL THEN
        RETURN v_reason || ' (run pgconsistency.set_refresh_mode(' || pg_catalog.quote_literal(invariant) || ', ''incremental'') to restore it)';
    END IF;
    SELECT 'the periodic reconcile (full_refresh_period ' || i.full_refresh_period || ')' INTO v_reason
      FROM pgconsistency.invariant i
      LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
     WHERE i.name = reconcile_reason.invariant
       AND (s.last_full_refresh_at IS NULL OR s.last_full_refresh_at <= pg_catalog.clock_timestamp() - i.full_refresh_period);
    RETURN v_reason;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.reconcile_reason(text) IS
  'Internal: why an invariant in incremental mode needs a full refresh now, or NULL';

-- requires: whether every relation a pack's invariant reads exists; if not,
-- a NOTICE names the invariant, what is missing and what to do, and the
-- pack skips the invariant. Packs call it as
--   SELECT pgconsistency.define_invariant(...) WHERE pgconsistency.requires('name', 'public.table', ...);
-- so an invariant over a table that a later migration creates appears when
-- install.sql runs after that migration.
CREATE OR REPLACE FUNCTION pgconsistency.requires(invariant text, VARIADIC relations text[]) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
SET client_min_messages = notice
AS $fn$
DECLARE
    v_missing text[];
BEGIN
    SELECT pg_catalog.array_agg(r ORDER BY r) INTO v_missing
      FROM pg_catalog.unnest(relations) AS r
     WHERE pg_catalog.to_regclass(r) IS NULL;
    IF v_missing IS NULL THEN
        RETURN true;
    END IF;
    RAISE NOTICE 'pgconsistency: invariant % not installed: it reads %, which this database does not have',
        invariant, pg_catalog.array_to_string(v_missing, ', ')
        USING HINT = 'Run install.sql again after the migration that creates it.';
    RETURN false;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.requires(text, text[]) IS
  'For packs: true when every relation an invariant reads exists; otherwise a NOTICE saying which are missing';

-- release_table: make way for a migration that drops, re-creates or
-- changes the type of a column of an application table, where materialized
-- views of register_invariant() read it: PostgreSQL refuses such a migration
-- while views depend on the table ("cannot drop table … because other
-- objects depend on it"). Since 0.3.0 the invariants of define_invariant()
-- hold no such dependency (the framework runs their queries; their views
-- read pgconsistency.anomaly), so there is nothing to release for them; a
-- view of register_invariant() is not dropped either: a NOTICE names it, to
-- drop and re-create yourself. Returns the names of views it dropped (none
-- since 0.3.0; kept for the deploy scripts that call it).
CREATE OR REPLACE FUNCTION pgconsistency.release_table(relation regclass) RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT DISTINCT i.name, i.view_schema, i.view_name, i.query_md5 IS NOT NULL AS defined
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_rewrite w ON w.oid = d.objid
          JOIN pg_catalog.pg_class c ON c.oid = w.ev_class
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pgconsistency.invariant i ON i.view_schema = n.nspname AND i.view_name = c.relname
         WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
           AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.refobjid = relation
         ORDER BY i.name
    LOOP
        IF NOT v.defined THEN
            RAISE NOTICE 'pgconsistency: %.% (invariant %) reads % but was not made by define_invariant: drop and re-create it yourself',
                v.view_schema, v.view_name, v.name, relation;
            CONTINUE;
        END IF;
        PERFORM pgconsistency.install_ddl(pg_catalog.format('DROP MATERIALIZED VIEW %I.%I', v.view_schema, v.view_name));
        RETURN NEXT v.name;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.release_table(regclass) IS
  'Drop the invariant views that read a table, so that a migration can drop or rewrite it; install.sql re-creates them';

-- The last value seen of the deploy marker (a query the receiver watches, such
-- as SELECT max(version) FROM schema_migrations). One row.
CREATE TABLE IF NOT EXISTS pgconsistency.deploy_marker (
    singleton  boolean     PRIMARY KEY DEFAULT true CONSTRAINT deploy_marker_one_row CHECK (singleton),
    value      text,
    seen_at    timestamptz NOT NULL,
    changed_at timestamptz
);
SELECT pgconsistency.install_comment('pgconsistency.deploy_marker',
  'Last seen value of the deploy marker; written by pgconsistency.observe_deploy_marker()');

-- observe_deploy_marker: record the marker's current value; when it differs
-- from the last one seen, request a refresh after delay (the deployment must
-- settle first) and return true. The first value ever seen only sets the
-- baseline. Several collectors may call it: one of them sees the change.
CREATE OR REPLACE FUNCTION pgconsistency.observe_deploy_marker(value text, delay interval DEFAULT '10 minutes')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old text;
BEGIN
    INSERT INTO pgconsistency.deploy_marker AS m (value, seen_at)
    VALUES (observe_deploy_marker.value, pg_catalog.clock_timestamp())
    ON CONFLICT ON CONSTRAINT deploy_marker_pkey DO NOTHING;
    IF FOUND THEN
        RETURN false; -- baseline
    END IF;
    UPDATE pgconsistency.deploy_marker m
       SET value = observe_deploy_marker.value, seen_at = pg_catalog.clock_timestamp(),
           changed_at = pg_catalog.clock_timestamp()
      FROM (SELECT d.value FROM pgconsistency.deploy_marker d FOR UPDATE) old
     WHERE m.value IS DISTINCT FROM observe_deploy_marker.value
    RETURNING old.value INTO v_old;
    IF NOT FOUND THEN
        UPDATE pgconsistency.deploy_marker m SET seen_at = pg_catalog.clock_timestamp();
        RETURN false;
    END IF;
    PERFORM pgconsistency.request_refresh(delay,
        pg_catalog.format('deploy marker changed from %s to %s', coalesce(v_old, 'NULL'), coalesce(value, 'NULL')));
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.observe_deploy_marker(text, interval) IS
  'Record the deploy marker; on a change, request a refresh after delay. Called by the receiver';

-- open_counts: the open anomalies of an invariant, not acknowledged and
-- acknowledged (an acknowledgement past its "until" no longer counts).
-- O(open anomalies of the invariant), through the partial index.
CREATE OR REPLACE FUNCTION pgconsistency.open_counts(invariant text, OUT open bigint, OUT acknowledged bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT count(*) FILTER (WHERE NOT a.is_acked), count(*) FILTER (WHERE a.is_acked)
      FROM (SELECT a.acknowledged_at IS NOT NULL AND (a.ack_until IS NULL OR a.ack_until > pg_catalog.now()) AS is_acked
              FROM pgconsistency.anomaly a
             WHERE a.invariant = open_counts.invariant AND a.resolved_at IS NULL) a
$fn$;

-- recount: bring the stored counts of an invariant up to date after an
-- acknowledgement changed, so the status view stays a read of stored numbers.
CREATE OR REPLACE FUNCTION pgconsistency.recount(invariant text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE pgconsistency.refresh_state s
       SET anomalies = c.open, acknowledged_anomalies = c.acknowledged
      FROM pgconsistency.open_counts(recount.invariant) c
     WHERE s.invariant = recount.invariant
$fn$;

-- acknowledge_open: the one place acknowledgements are given. key NULL means
-- every anomaly open now in the invariant. Internal: use acknowledge() or
-- acknowledge_all().
CREATE OR REPLACE FUNCTION pgconsistency.acknowledge_open(
    invariant text, key text, reason text, until timestamptz
) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_count integer;
BEGIN
    IF coalesce(pg_catalog.btrim(reason), '') = '' THEN
        RAISE EXCEPTION 'pgconsistency: acknowledging needs a reason'
            USING HINT = 'Say why the anomaly may stay, e.g. reason => ''known leftover of the 2026-11 incident, not recoverable''.';
    END IF;
    IF until IS NOT NULL AND until <= pg_catalog.now() THEN
        RAISE EXCEPTION 'pgconsistency: acknowledgement until % is already past', until;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = acknowledge_open.invariant) THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    UPDATE pgconsistency.anomaly a
       SET acknowledged_at = pg_catalog.now(), acknowledged_by = session_user,
           ack_reason = acknowledge_open.reason, ack_until = acknowledge_open.until
     WHERE a.invariant = acknowledge_open.invariant AND a.resolved_at IS NULL
       AND (acknowledge_open.key IS NULL OR a.key = acknowledge_open.key);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count = 0 AND key IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: no open anomaly % in invariant %', pg_catalog.quote_literal(key), pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT key FROM pgconsistency.anomaly WHERE invariant = ... AND resolved_at IS NULL lists the open ones.';
    END IF;
    PERFORM pgconsistency.recount(invariant);
    RETURN v_count;
END
$fn$;

-- acknowledge: take a known, open anomaly out of pgconsistency.anomalies
-- (it is counted in acknowledged_anomalies instead) until it is resolved, or
-- until "until" passes. A new anomaly in the same invariant still counts and
-- alerts. Returns the number of anomalies acknowledged (1).
CREATE OR REPLACE FUNCTION pgconsistency.acknowledge(
    invariant text, key text, reason text, until timestamptz DEFAULT NULL
) RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pgconsistency.acknowledge_open(acknowledge.invariant, acknowledge.key, acknowledge.reason, acknowledge.until)
$fn$;

-- acknowledge_all: acknowledge every anomaly open now in one invariant, with
-- one reason: the "known leftovers" case. Anomalies appearing later are new
-- and count. Returns how many were acknowledged.
CREATE OR REPLACE FUNCTION pgconsistency.acknowledge_all(
    invariant text, reason text, until timestamptz DEFAULT NULL
) RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pgconsistency.acknowledge_open(acknowledge_all.invariant, NULL, acknowledge_all.reason, acknowledge_all.until)
$fn$;

-- unacknowledge: the anomaly counts again. Returns 1, or 0 if it was not acknowledged.
CREATE OR REPLACE FUNCTION pgconsistency.unacknowledge(invariant text, key text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_count integer;
BEGIN
    UPDATE pgconsistency.anomaly a
       SET acknowledged_at = NULL, acknowledged_by = NULL, ack_reason = NULL, ack_until = NULL
     WHERE a.invariant = unacknowledge.invariant AND a.key = unacknowledge.key AND a.acknowledged_at IS NOT NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM pgconsistency.recount(invariant);
    RETURN v_count;
END
$fn$;

-- expire_acknowledgements: acknowledgements past their "until" end, and the
-- counts of their invariants are brought up to date. O(expired). Run by
-- refresh() on every call, so expiries take effect within a minute under
-- pg_cron or the receiver's scheduler. Returns how many expired.
CREATE OR REPLACE FUNCTION pgconsistency.expire_acknowledgements() RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_invariants text[];
    v_name text;
    v_count integer;
BEGIN
    WITH expired AS (
        UPDATE pgconsistency.anomaly a
           SET acknowledged_at = NULL, acknowledged_by = NULL, ack_reason = NULL, ack_until = NULL
         WHERE a.ack_until <= pg_catalog.now()
        RETURNING a.invariant)
    SELECT pg_catalog.array_agg(DISTINCT e.invariant), count(*) INTO v_invariants, v_count FROM expired e;
    FOREACH v_name IN ARRAY coalesce(v_invariants, '{}') LOOP
        PERFORM pgconsistency.recount(v_name);
    END LOOP;
    RETURN v_count;
END
$fn$;

-- log_cursor_owned: the cursor of a log consumer, locked, after checking
-- that the calling role (the login role: session_user, since the callers are
-- SECURITY DEFINER) may use it: its owner, or a role with the privileges of
-- pgconsistency's owner. A cursor without an owner (made before 0.2.0) is
-- taken over by its next user. NULL when the consumer has no cursor yet.
-- Internal to new_anomalies_for_log and advance_log_cursor.
CREATE OR REPLACE FUNCTION pgconsistency.log_cursor_owned(consumer text) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_owner text;
    v_last  bigint;
BEGIN
    SELECT c.owner, c.last_seq INTO v_owner, v_last
      FROM pgconsistency.log_cursor c WHERE c.consumer = log_cursor_owned.consumer FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_owner IS NULL THEN
        UPDATE pgconsistency.log_cursor c SET owner = session_user WHERE c.consumer = log_cursor_owned.consumer;
    ELSIF v_owner IS DISTINCT FROM session_user::text
          AND NOT pg_catalog.pg_has_role(session_user,
                  (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgconsistency'), 'USAGE') THEN
        RAISE EXCEPTION 'pgconsistency: the log cursor of consumer % belongs to role %, not to %',
            pg_catalog.quote_literal(consumer), pg_catalog.quote_ident(v_owner), pg_catalog.quote_ident(session_user)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Each log consumer (a receiver id) reads and moves its own cursor: give this receiver another id, '
                         'or connect as the role that owns the cursor.';
    END IF;
    RETURN v_last;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.log_cursor_owned(text) IS
  'Internal: lock a log consumer''s cursor after checking that the calling role owns it';

-- new_anomalies_for_log: the anomalies that appeared since a log consumer's
-- cursor, oldest first, at most max_rows. A consumer seen for the first time
-- starts at the current end: what was there before is not new to it.
-- advance_log_cursor() moves the cursor once the records were delivered.
-- Each anomaly is delivered exactly once even when refreshes run at the
-- same time: seqs are taken in commit order (see refresh_invariant).
-- details (the anomaly's row: it copies application data) only for a role
-- granted them on purpose: GRANT SELECT (details) ON pgconsistency.anomaly.
CREATE OR REPLACE FUNCTION pgconsistency.new_anomalies_for_log(consumer text, max_rows integer)
RETURNS TABLE (seq bigint, invariant text, severity text, key text, details jsonb, first_seen_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_last    bigint := pgconsistency.log_cursor_owned(consumer);
    v_details boolean := pg_catalog.has_column_privilege(session_user, 'pgconsistency.anomaly', 'details', 'SELECT');
BEGIN
    IF v_last IS NULL THEN
        INSERT INTO pgconsistency.log_cursor AS c (consumer, last_seq, updated_at, owner)
        VALUES (new_anomalies_for_log.consumer, coalesce((SELECT max(a.seq) FROM pgconsistency.anomaly a), 0),
                pg_catalog.now(), session_user)
        ON CONFLICT ON CONSTRAINT log_cursor_pkey DO NOTHING;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT a.seq, a.invariant, i.severity, a.key, CASE WHEN v_details THEN a.details END, a.first_seen_at
          FROM pgconsistency.anomaly a
          JOIN pgconsistency.invariant i ON i.name = a.invariant
         WHERE a.seq > v_last
         ORDER BY a.seq
         LIMIT max_rows;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.new_anomalies_for_log(text, integer) IS
  'The new anomalies after a log consumer''s cursor, oldest first (details only with SELECT (details) ON pgconsistency.anomaly)';

-- advance_log_cursor: the consumer delivered every record up to seq.
CREATE OR REPLACE FUNCTION pgconsistency.advance_log_cursor(consumer text, seq bigint) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pgconsistency.log_cursor_owned(consumer) IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: consumer % has no log cursor', pg_catalog.quote_literal(consumer)
            USING HINT = 'new_anomalies_for_log(consumer, max_rows) creates it.';
    END IF;
    UPDATE pgconsistency.log_cursor c
       SET last_seq = GREATEST(c.last_seq, advance_log_cursor.seq), updated_at = pg_catalog.now()
     WHERE c.consumer = advance_log_cursor.consumer;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.advance_log_cursor(text, bigint) IS
  'Move a log consumer''s cursor past the records it delivered (only the role that owns the cursor)';

-- refresh_due: whether an invariant whose latest refresh started at
-- last_started_at is due at "at": its refresh_period has passed, up to a
-- tenth of it (at most 30 s) early, so that a schedule whose tick equals
-- the period does not miss every other tick by a few milliseconds of jitter.
CREATE OR REPLACE FUNCTION pgconsistency.refresh_due(last_started_at timestamptz, refresh_period interval, at timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT last_started_at IS NULL
        OR last_started_at <= at - refresh_period + least(interval '30 seconds', refresh_period / 10)
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_due(timestamptz, interval, timestamptz) IS
  'Internal: whether an invariant''s refresh_period has passed since its latest refresh started';

-- Older signatures, replaced below (CREATE OR REPLACE cannot change them).
DROP FUNCTION IF EXISTS pgconsistency.refresh_invariant(text);
DROP PROCEDURE IF EXISTS pgconsistency.refresh(text);

-- refresh_invariant: refresh one invariant in the current transaction.
-- Internal: call pgconsistency.refresh(), which commits after each invariant.
-- With force false, an invariant whose refresh_period has not passed since
-- its previous refresh started is left alone. Returns the outcome:
-- 'succeeded', 'failed', 'timed_out', 'skipped' (another session holds the
-- invariant) or 'not_due'.
--
-- A refresh has two steps. The first computes the invariant's rows into a
-- temporary table: its query, whole (a full refresh) or for the pending
-- keys only (incremental), or, for a view of register_invariant(), a
-- REFRESH MATERIALIZED VIEW and a read of it. The second, the lifecycle,
-- compares those rows with the open anomalies and writes only what changed.
CREATE OR REPLACE FUNCTION pgconsistency.refresh_invariant(invariant text, force boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    inv        pgconsistency.invariant%ROWTYPE;
    v_started  timestamptz := pg_catalog.clock_timestamp();
    v_finished timestamptz;
    v_populated boolean;
    v_total    bigint;
    v_new      bigint;
    v_resolved bigint;
    v_acked    bigint;
    v_healed   bigint := 0;
    v_kind     text := 'full';
    v_reason   text;
    v_keys     text[];
    v_rechecked bigint := 0;
    v_fresh_capture boolean := false;
    v_prev_seen timestamptz;
    v_status   text := 'succeeded';
    v_error    text;
    v_hint     text;
    v_detail   text;
    v_state    text;
    v_timeout  text;
BEGIN
    SELECT * INTO inv FROM pgconsistency.invariant i WHERE i.name = refresh_invariant.invariant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;

    -- One refresh per invariant at a time, across sessions and collectors.
    -- Transaction-scoped, so it also works behind transaction-pooling proxies.
    -- Skip rather than wait: the running refresh produces the same snapshot.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgconsistency'), pg_catalog.hashtext(inv.name)) THEN
        RAISE NOTICE 'pgconsistency: refresh of % skipped: another session is refreshing it right now; its result will be the same', inv.name;
        -- Record the skip only if the state row is free: never wait for the
        -- running refresh (it holds the row until it commits).
        UPDATE pgconsistency.refresh_state s
           SET last_skipped_at = v_started, skips = s.skips + 1
         WHERE s.invariant = (SELECT s2.invariant FROM pgconsistency.refresh_state s2
                               WHERE s2.invariant = inv.name FOR UPDATE SKIP LOCKED);
        RETURN 'skipped';
    END IF;

    -- Due? Checked under the lock, on committed state, so two schedulers
    -- never refresh the same invariant twice in one period.
    IF NOT force AND NOT pgconsistency.refresh_due(
        (SELECT s.last_started_at FROM pgconsistency.refresh_state s WHERE s.invariant = inv.name),
        inv.refresh_period, v_started) THEN
        RETURN 'not_due';
    END IF;
    SELECT s.refreshed_at INTO v_prev_seen FROM pgconsistency.refresh_state s WHERE s.invariant = inv.name;

    -- Bounded waits: a refresh must never queue writers behind it. It takes
    -- ACCESS SHARE on the tables it reads (and REFRESH CONCURRENTLY an
    -- EXCLUSIVE lock on a registered view: reads go on).
    PERFORM pg_catalog.set_config('lock_timeout', (EXTRACT(epoch FROM inv.lock_timeout) * 1000)::bigint::text, true);

    BEGIN
        -- The rows of this refresh: a temporary table of the session, made
        -- once (not per refresh: that would write the catalog each time),
        -- emptied at every commit.
        IF pg_catalog.to_regclass('pg_temp.pgconsistency_result') IS NULL THEN
            CREATE TEMPORARY TABLE pgconsistency_result (key text PRIMARY KEY, details jsonb) ON COMMIT DELETE ROWS;
        ELSE
            DELETE FROM pg_temp.pgconsistency_result; -- empty, unless an earlier refresh of this transaction used it
        END IF;

        IF inv.query IS NULL THEN
            -- A materialized view of register_invariant().
            PERFORM pgconsistency.apply_refresh_settings(inv.settings);
            SELECT c.relispopulated INTO v_populated
              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = inv.view_schema AND c.relname = inv.view_name AND c.relkind = 'm';
            IF NOT FOUND THEN
                RAISE EXCEPTION 'materialized view %.% does not exist', inv.view_schema, inv.view_name
                    USING HINT = 'Re-create it and run register_invariant again, or unregister the invariant.';
            END IF;
            -- CONCURRENTLY needs a populated view; the first refresh populates it.
            EXECUTE pg_catalog.format(CASE WHEN v_populated THEN 'REFRESH MATERIALIZED VIEW CONCURRENTLY %I.%I'
                                           ELSE 'REFRESH MATERIALIZED VIEW %I.%I' END, inv.view_schema, inv.view_name);
            EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result SELECT v.key, pg_catalog.to_jsonb(v) - ''key'' FROM %I.%I v',
                                      inv.view_schema, inv.view_name);
        ELSE
            IF inv.refresh_mode = 'incremental' THEN
                -- The keys captured since the previous refresh; a full
                -- refresh (a reconcile) when something says the capture
                -- may have missed writes, or when too many keys changed.
                PERFORM pgconsistency.dispatch_captured_keys();
                v_reason := pgconsistency.reconcile_reason(inv.name);
                WITH taken AS (DELETE FROM pgconsistency.pending_key p WHERE p.invariant = inv.name RETURNING p.key)
                SELECT pg_catalog.array_agg(DISTINCT taken.key) INTO v_keys FROM taken;
                IF v_reason IS NULL AND pg_catalog.cardinality(v_keys) > inv.incremental_max_keys THEN
                    v_reason := pg_catalog.format('%s keys changed, more than its incremental_max_keys (%s)',
                                                  pg_catalog.cardinality(v_keys), inv.incremental_max_keys);
                END IF;
                v_kind := CASE WHEN v_reason IS NULL THEN 'incremental' ELSE 'reconcile' END;
                -- What the first reconcile after a switch to incremental
                -- mode (or after a changed query or key mapping) finds was
                -- never the capture's to see: not counted as healed.
                v_fresh_capture := v_reason IN (pgconsistency.reconcile_reason_started(), pgconsistency.reconcile_reason_changed());
            END IF;
            IF v_kind = 'incremental' THEN
                -- Only the pending keys, by the tables' indexes: the
                -- invariant's incremental settings (settings->'incremental';
                -- the dataset pack's force lookups by key: without them
                -- PostgreSQL reads dataset_entries whole to join a few
                -- keys), not those of its full refresh.
                PERFORM pgconsistency.apply_refresh_settings(coalesce(inv.settings -> 'incremental', '{}'));
                v_rechecked := coalesce(pg_catalog.cardinality(v_keys), 0);
                IF v_rechecked > 0 THEN
                    EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                               SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q WHERE q.key = ANY ($1)', inv.query)
                        USING v_keys;
                END IF;
            ELSE
                -- The whole query, with the invariant's planner settings
                -- (the dataset pack's are merge joins over whole tables: no
                -- plan of theirs depends on how many rows an incident
                -- changed). The refresh writes nothing the query reads.
                PERFORM pgconsistency.apply_refresh_settings(inv.settings);
                EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                           SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q', inv.query);
            END IF;
        END IF;

        IF v_kind = 'incremental' AND v_rechecked = 0 THEN
            -- Nothing was written to its tables: nothing to compare.
            v_new := 0; v_resolved := 0;
        ELSE
            -- New anomalies take their seqs (the order of the log records) under
            -- a lock held until this transaction commits: seqs then become
            -- visible in increasing order, so a log consumer that has read up to
            -- seq N never meets a smaller one later, whatever the refreshes
            -- running at the same time (nextval alone does not order commits).
            -- Concurrent refreshes queue here for the lifecycle step only.
            PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.anomaly_seq'), 0);

            -- The lifecycle joins the rows with pgconsistency.anomaly, whose
            -- statistics a mass incident has just made wrong (100,000 anomalies
            -- inserted by the previous refresh, not analysed yet), as are the
            -- temporary table's (never analysed). So the server's planner
            -- settings, and no nested loop: hash or merge joins, linear
            -- whatever the statistics.
            PERFORM pg_catalog.set_config(e.key, s.reset_val, true)
               FROM (SELECT k FROM pg_catalog.jsonb_object_keys(inv.settings - 'incremental') AS k
                     UNION
                     SELECT k FROM pg_catalog.jsonb_object_keys(coalesce(inv.settings -> 'incremental', '{}')) AS k) AS e(key)
               JOIN pg_catalog.pg_settings s ON s.name = e.key;
            PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);

            -- O(changes) writes: an anomaly appears (new, or back again), is
            -- resolved (open, but not in the rows), or its details changed.
            -- Nothing for one that persists. An incremental refresh compares
            -- its keys only ($3). A reconcile counts what differed for keys
            -- that were not pending ($5): what the incremental refreshes missed.
            EXECUTE $q$
                WITH o AS (
                    SELECT a.key, a.details FROM pgconsistency.anomaly a
                     WHERE a.invariant = $1 AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3))),
                d AS MATERIALIZED (
                    SELECT coalesce(r.key, o.key) AS key, r.details, r.key IS NOT NULL AS present, o.key IS NOT NULL AS was_open
                      FROM pg_temp.pgconsistency_result r FULL JOIN o ON o.key = r.key
                     WHERE r.key IS NULL OR o.key IS NULL OR r.details IS DISTINCT FROM o.details),
                appeared AS (
                    INSERT INTO pgconsistency.anomaly AS a (invariant, key, seq, first_seen_at, last_seen_at, details)
                    SELECT $1, d.key, pg_catalog.nextval('pgconsistency.anomaly_seq'), $2, $2, d.details
                      FROM d WHERE d.present AND NOT d.was_open
                     ORDER BY d.key
                    ON CONFLICT ON CONSTRAINT anomaly_pkey DO UPDATE
                       SET seq = EXCLUDED.seq, first_seen_at = EXCLUDED.first_seen_at,
                           last_seen_at = EXCLUDED.last_seen_at, resolved_at = NULL, details = EXCLUDED.details,
                           acknowledged_at = NULL, acknowledged_by = NULL, ack_reason = NULL, ack_until = NULL
                    RETURNING 1),
                resolved AS (
                    UPDATE pgconsistency.anomaly a SET resolved_at = $2, last_seen_at = coalesce($4, a.last_seen_at)
                      FROM d
                     WHERE a.invariant = $1 AND a.key = d.key AND NOT d.present
                       AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3))
                    RETURNING 1),
                changed AS ( -- runs although nothing reads it, as every data-modifying WITH
                    UPDATE pgconsistency.anomaly a SET details = d.details
                      FROM d
                     WHERE a.invariant = $1 AND a.key = d.key AND d.present AND d.was_open
                       AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3)))
                SELECT (SELECT count(*) FROM appeared), (SELECT count(*) FROM resolved),
                       (SELECT count(*) FROM d
                         WHERE $5::text[] IS NOT NULL
                           AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest($5::text[]) AS p(key) WHERE p.key = d.key))
            $q$
            INTO v_new, v_resolved, v_healed
            USING inv.name, v_started, CASE WHEN v_kind = 'incremental' THEN coalesce(v_keys, '{}') END, v_prev_seen,
                  CASE WHEN v_kind = 'reconcile' AND NOT v_fresh_capture THEN coalesce(v_keys, '{}') END;
        END IF;
        SELECT c.open, c.acknowledged INTO v_total, v_acked FROM pgconsistency.open_counts(inv.name) c;
        IF v_kind = 'reconcile' THEN
            UPDATE pgconsistency.capture_state c SET reconcile_reason = NULL WHERE c.invariant = inv.name;
            IF v_healed > 0 THEN
                RAISE WARNING 'pgconsistency: the reconcile of % found % anomalies (appeared, resolved or changed) that its incremental refreshes had missed, and corrected them',
                    inv.name, v_healed
                    USING DETAIL = 'Reconciled because ' || v_reason || '.',
                          HINT = 'A write the capture did not see: a TRUNCATE, a disabled trigger, or a key mapping (define_invariant keys) that misses some rows.';
            END IF;
        END IF;
        -- Retention: resolved anomalies older than resolved_retention go,
        -- except those a log consumer has not read yet.
        DELETE FROM pgconsistency.anomaly a
         WHERE a.invariant = inv.name
           AND a.resolved_at < v_started - inv.resolved_retention
           AND a.seq <= coalesce((SELECT min(c.last_seq) FROM pgconsistency.log_cursor c), a.seq);
        IF inv.after_refresh IS NOT NULL THEN
            -- regprocedure: the name must resolve to a function of one text argument.
            EXECUTE pg_catalog.format('SELECT %s($1)', (inv.after_refresh || '(text)')::regprocedure::oid::regproc)
                USING inv.name;
        END IF;
    EXCEPTION
        WHEN query_canceled THEN
            -- 57014 is a statement timeout or a cancel (pg_cancel_backend,
            -- Ctrl-C). Not told apart by the message, which follows
            -- lc_messages: a timeout is a cancel that came once the
            -- statement_timeout armed for this statement had passed.
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
            v_timeout := pg_catalog.current_setting('statement_timeout');
            IF v_timeout IN ('0', '') OR pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()
                                         < (CASE WHEN v_timeout ~ '^[0-9]+$' THEN v_timeout || 'ms' ELSE v_timeout END)::interval
                                           - interval '5 milliseconds' THEN
                RAISE; -- a cancel by the user or an administrator stops the whole refresh
            END IF;
            v_status := 'timed_out';
            v_error := pg_catalog.format('%s: the refresh ran longer than the statement_timeout in force (%s; the invariant''s statement_timeout is %s, in force under the receiver''s scheduler)',
                                         v_error, v_timeout, inv.statement_timeout);
            v_hint := pg_catalog.format('Raise it with UPDATE pgconsistency.invariant SET statement_timeout = ... WHERE name = %L, or make the query cheaper.', inv.name);
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT, v_state = RETURNED_SQLSTATE,
                                    v_detail = PG_EXCEPTION_DETAIL;
            IF v_state = '55P03' THEN -- lock_not_available: lock_timeout
                v_status := 'timed_out';
                v_error := pg_catalog.format('%s: waited longer than the invariant''s lock_timeout (%s) for a lock held by another session',
                                             v_error, inv.lock_timeout);
                v_hint := 'A long transaction or DDL on the tables the invariant reads holds the lock; the next refresh tries again.';
            ELSIF v_state = '23505' AND v_error LIKE '%pgconsistency_result_pkey%' THEN -- unique_violation in the rows
                v_status := 'failed';
                v_error := pg_catalog.format('its query returned the same key more than once (%s)', v_detail);
                v_hint := 'Each row of an invariant is one offending entity: GROUP BY the key, or aggregate the details.';
            ELSIF v_state = '23502' AND v_error LIKE '%pgconsistency_result%' THEN -- not_null_violation in the rows
                v_status := 'failed';
                v_error := 'its query returned a row whose key is NULL';
                v_hint := 'Select a NOT NULL key, or filter the rows without one.';
            ELSE
                v_status := 'failed';
            END IF;
    END;
    IF coalesce(v_hint, '') <> '' THEN
        v_error := v_error || ' (hint: ' || v_hint || ')';
    END IF;

    v_finished := pg_catalog.clock_timestamp();

    IF v_status = 'succeeded' THEN
        INSERT INTO pgconsistency.refresh_state AS s
               (invariant, last_status, last_started_at, last_finished_at, last_duration_seconds, last_error,
                refreshed_at, refresh_duration_seconds, anomalies, new_anomalies, resolved_anomalies,
                acknowledged_anomalies, consecutive_failures, last_refresh_kind, last_full_refresh_at,
                rechecked_keys, healed_anomalies, last_healed_at)
        VALUES (inv.name, 'succeeded', v_started, v_finished,
                EXTRACT(epoch FROM v_finished - v_started)::double precision, NULL,
                v_finished, EXTRACT(epoch FROM v_finished - v_started)::double precision,
                v_total, v_new, v_resolved, v_acked, 0, v_kind,
                CASE WHEN v_kind <> 'incremental' THEN v_started END, v_rechecked, v_healed,
                CASE WHEN v_healed > 0 THEN v_finished END)
        ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
           SET last_status = EXCLUDED.last_status, last_started_at = EXCLUDED.last_started_at,
               last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
               last_error = NULL, refreshed_at = EXCLUDED.refreshed_at,
               refresh_duration_seconds = EXCLUDED.refresh_duration_seconds,
               anomalies = EXCLUDED.anomalies, new_anomalies = EXCLUDED.new_anomalies,
               resolved_anomalies = EXCLUDED.resolved_anomalies,
               acknowledged_anomalies = EXCLUDED.acknowledged_anomalies, consecutive_failures = 0,
               last_refresh_kind = EXCLUDED.last_refresh_kind,
               last_full_refresh_at = coalesce(EXCLUDED.last_full_refresh_at, s.last_full_refresh_at),
               rechecked_keys = EXCLUDED.rechecked_keys,
               -- what the latest reconcile healed stays until the next one
               healed_anomalies = CASE WHEN EXCLUDED.last_refresh_kind = 'incremental' THEN s.healed_anomalies
                                       ELSE EXCLUDED.healed_anomalies END,
               last_healed_at = coalesce(EXCLUDED.last_healed_at, s.last_healed_at);
        RETURN 'succeeded';
    END IF;

    -- The snapshot (refreshed_at, anomalies) is left as it was: it is still the
    -- latest good one, and its age shows that it is getting stale.
    RAISE WARNING 'pgconsistency: refresh of % %: %', inv.name, replace(v_status, '_', ' '), v_error;
    INSERT INTO pgconsistency.refresh_state AS s
           (invariant, last_status, last_started_at, last_finished_at, last_duration_seconds, last_error, consecutive_failures)
    VALUES (inv.name, v_status, v_started, v_finished, EXTRACT(epoch FROM v_finished - v_started)::double precision, v_error, 1)
    ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
       SET last_status = EXCLUDED.last_status, last_started_at = EXCLUDED.last_started_at,
           last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
           last_error = EXCLUDED.last_error, consecutive_failures = s.consecutive_failures + 1;
    RETURN v_status;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_invariant(text, boolean) IS
  'Internal: refresh one invariant in the current transaction; use CALL pgconsistency.refresh() instead';

-- refresh_plan: the first step of every refresh loop (CALL refresh(),
-- pg_cron, the receiver's scheduler): on the primary, it takes a due refresh
-- request (which then runs once, however many schedulers poll), ends the
-- acknowledgements past their "until", and returns the invariants to
-- refresh now (name), each with the force flag to pass to refresh_invariant
-- (forced) and its statement_timeout in milliseconds. With invariant NULL: the enabled ones
-- that are due, or all enabled ones when force is true or a request is due;
-- with a name: that one (force defaults to true). Commit after it, then run
-- refresh_invariant(invariant, force) once per row, one transaction each.
-- On a standby it returns nothing: the primary's refreshes replicate there.
CREATE OR REPLACE FUNCTION pgconsistency.refresh_plan(invariant text DEFAULT NULL, force boolean DEFAULT NULL)
RETURNS TABLE (name text, forced boolean, statement_timeout_ms bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_force boolean := coalesce(refresh_plan.force, refresh_plan.invariant IS NOT NULL);
    v_now   timestamptz := pg_catalog.clock_timestamp();
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE NOTICE 'pgconsistency: nothing refreshed: this server is a standby; refreshes run on the primary and replicate here';
        RETURN;
    END IF;
    IF refresh_plan.invariant IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = refresh_plan.invariant) THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(refresh_plan.invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    IF refresh_plan.invariant IS NULL AND pgconsistency.claim_refresh_request() THEN
        v_force := true;
    END IF;
    PERFORM pgconsistency.expire_acknowledgements();
    RETURN QUERY
        SELECT i.name, v_force, (EXTRACT(epoch FROM i.statement_timeout) * 1000)::bigint
          FROM pgconsistency.invariant i
          LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
         WHERE CASE WHEN refresh_plan.invariant IS NOT NULL THEN i.name = refresh_plan.invariant
                    ELSE i.enabled AND (v_force OR pgconsistency.refresh_due(s.last_started_at, i.refresh_period, v_now)) END
         ORDER BY i.name;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_plan(text, boolean) IS
  'First step of a refresh loop: take a due request, expire acknowledgements, list the invariants to refresh now';

-- refresh: CALL pgconsistency.refresh() refreshes every enabled invariant
-- that is due (its refresh_period has passed), and every enabled invariant
-- when a requested refresh (request_refresh) is due.
-- CALL pgconsistency.refresh('name') refreshes that one, due or not;
-- CALL pgconsistency.refresh(force => true) refreshes all of them now.
-- Each invariant is refreshed and committed in its own transaction, so one
-- failure does not undo or stop the others. Not inside BEGIN ... COMMIT.
-- It is the one refresh loop: refresh_plan, then refresh_invariant per
-- invariant; the receiver's scheduler runs the same two steps as statements
-- of their own, so that each invariant's statement_timeout applies.
-- (No SET search_path here: a procedure with SET clauses cannot COMMIT; every
-- name in it is qualified instead. For the same reason it cannot be SECURITY
-- DEFINER: it runs as its caller, who needs EXECUTE on the SECURITY DEFINER
-- functions it calls; sql/roles.sql grants that to pgconsistency_refresher.)
CREATE OR REPLACE PROCEDURE pgconsistency.refresh(invariant text DEFAULT NULL, force boolean DEFAULT NULL)
LANGUAGE plpgsql
AS $pr$
DECLARE
    v_names text[];
    v_force boolean;
    v_name  text;
BEGIN
    SELECT pg_catalog.array_agg(p.name ORDER BY p.name), pg_catalog.bool_or(p.forced) INTO v_names, v_force
      FROM pgconsistency.refresh_plan(refresh.invariant, refresh.force) p;
    COMMIT; -- the claim is visible at once: the request runs once

    FOREACH v_name IN ARRAY coalesce(v_names, '{}') LOOP
        -- A refresh lost in a crash is redone by the next one: its commit
        -- need not wait for the WAL flush the application's commits wait for.
        PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
        PERFORM pgconsistency.refresh_invariant(v_name, v_force);
        COMMIT;
    END LOOP;
END
$pr$;
COMMENT ON PROCEDURE pgconsistency.refresh(text, boolean) IS
  'Refresh the enabled invariants that are due (all with force, or after a due request; the named one always), one transaction each';

-- status: one row per registered invariant; the one query the receiver runs
-- each scrape. It reads stored counts only (never the anomaly views), so its
-- cost does not depend on the size of the application tables.
--
-- Re-created only when its definition changed (install_view). The grants on
-- the view (to pgconsistency_reader, see sql/roles.sql) are kept.
DO $do$
DECLARE
    v_def text := $def$
SELECT i.name                                    AS invariant,
       i.severity,
       i.description,
       i.enabled,
       i.view_schema,
       i.view_name,
       i.refresh_period,
       EXTRACT(epoch FROM i.refresh_period)::double precision AS refresh_period_seconds,
       coalesce(s.anomalies, 0)                  AS anomalies,
       coalesce(s.new_anomalies, 0)              AS new_anomalies,
       coalesce(s.resolved_anomalies, 0)         AS resolved_anomalies,
       coalesce(s.acknowledged_anomalies, 0)     AS acknowledged_anomalies,
       s.refreshed_at,
       s.refresh_duration_seconds,
       coalesce(s.consecutive_failures, 0)       AS consecutive_failures,
       s.last_status,
       s.last_started_at,
       s.last_finished_at,
       s.last_duration_seconds,
       s.last_error,
       s.last_skipped_at,
       coalesce(s.skips, 0)                      AS skips,
       -- what happened last, a skip included: never, succeeded, failed, timed_out or skipped
       CASE WHEN s.invariant IS NULL THEN 'never'
            WHEN s.last_skipped_at > s.last_finished_at THEN 'skipped'
            ELSE s.last_status END               AS last_outcome,
       (SELECT count(*) FROM pgconsistency.refresh_request q WHERE q.claimed_at IS NULL) AS pending_requests,
       (SELECT d.changed_at FROM pgconsistency.deploy_marker d) AS deploy_marker_changed_at,
       -- the installed SQL version (0.2.0 and later), the same on every row
       pgconsistency.version()                   AS version,
       -- the refresh engine (0.3.0 and later)
       i.refresh_mode,
       s.last_refresh_kind,
       s.last_full_refresh_at,
       coalesce(s.rechecked_keys, 0)             AS rechecked_keys,
       coalesce(s.healed_anomalies, 0)           AS healed_anomalies,
       s.last_healed_at
  FROM pgconsistency.invariant i
  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
$def$;
BEGIN
    PERFORM pgconsistency.install_view('pgconsistency.status', v_def,
      'One row per registered invariant: latest snapshot counts and refresh outcome (cheap: reads stored state only)');
END
$do$;

-- PostgreSQL grants EXECUTE on every new function and procedure to PUBLIC.
-- With SECURITY DEFINER that would let any role that can connect refresh,
-- request refreshes, acknowledge anomalies or move log cursors: nobody but
-- the owner may run anything here until sql/roles.sql (or a DBA) grants it.
-- Re-running is harmless, and grants to other roles are kept (CREATE OR
-- REPLACE keeps a function's privileges).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgconsistency FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA pgconsistency FROM PUBLIC;
-- Except the pure check of the invariant table's settings constraint: a
-- CHECK constraint runs its functions with the privileges of whoever writes
-- the table.
GRANT EXECUTE ON FUNCTION pgconsistency.valid_refresh_settings(jsonb) TO PUBLIC;
-- And the version, which the status view calls (a view's functions run with
-- the privileges of the role reading the view).
GRANT EXECUTE ON FUNCTION pgconsistency.version() TO PUBLIC;

-- Upgrades: where sql/roles.sql ran before, the functions a release adds to
-- what its roles run get their grants now, so that a pg_cron job or a
-- collector running as one of them keeps working before roles.sql is re-run.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgconsistency_refresher') THEN
        GRANT EXECUTE ON FUNCTION pgconsistency.refresh_plan(text, boolean) TO pgconsistency_refresher; -- 0.2.0
    END IF;
END
$do$;
