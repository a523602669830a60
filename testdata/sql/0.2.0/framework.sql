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
AS $fn$ SELECT '0.2.0'::text $fn$;

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

-- The settings an invariant's refresh may change: the planner's and the
-- memory of one query; never anything that outlives the refresh's
-- transaction or touches security (set_config(..., true) is transaction-local).
CREATE OR REPLACE FUNCTION pgconsistency.valid_refresh_settings(settings jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_catalog.jsonb_typeof(settings) = 'object'
       AND NOT EXISTS (
           SELECT 1 FROM pg_catalog.jsonb_each(settings) AS e(k, v)
            WHERE e.k !~ '^(enable_[a-z_]+|work_mem|hash_mem_multiplier|max_parallel_workers_per_gather|random_page_cost|seq_page_cost|cpu_[a-z_]+_cost|effective_cache_size|jit|temp_buffers)$'
               OR pg_catalog.jsonb_typeof(e.v) NOT IN ('string', 'number', 'boolean'))
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

-- The lifecycle of every anomaly, by invariant and key: first seen, last seen,
-- resolved, acknowledged. Maintained by refresh() in O(anomalies): it is what
-- tells a new anomaly from an old one even when the total count stays the
-- same. A resolved anomaly that comes back is new again (new seq, new
-- first_seen_at, acknowledgement cleared). Resolved anomalies are deleted
-- after their invariant's resolved_retention.
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

    -- An unchanged registration writes nothing (install.sql runs on every deploy).
    INSERT INTO pgconsistency.invariant AS i (name, description, severity, view_schema, view_name)
    VALUES (register_invariant.name, coalesce(register_invariant.description, ''), register_invariant.severity,
            register_invariant.view_schema, register_invariant.view_name)
    ON CONFLICT ON CONSTRAINT invariant_pkey DO UPDATE
       SET description = EXCLUDED.description,
           severity    = EXCLUDED.severity,
           view_schema = EXCLUDED.view_schema,
           view_name   = EXCLUDED.view_name
     WHERE (i.description, i.severity, i.view_schema, i.view_name)
           IS DISTINCT FROM (EXCLUDED.description, EXCLUDED.severity, EXCLUDED.view_schema, EXCLUDED.view_name);
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
    PERFORM pg_catalog.set_config(e.key, e.value, true) FROM pg_catalog.jsonb_each_text(settings) AS e;
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

-- settings, when given, are the refresh settings (see the invariant table)
-- of a new invariant, or of one whose query changed; otherwise the settings
-- a DBA may have changed since (UPDATE pgconsistency.invariant SET settings)
-- are kept. NULL keeps them as they are.
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text);
CREATE OR REPLACE FUNCTION pgconsistency.define_invariant(
    name        text,
    query       text,
    severity    text DEFAULT 'warning',
    description text DEFAULT NULL,
    settings    jsonb DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_md5      text := pg_catalog.md5(query);
    v_existing text;
    v_relkind  "char";
BEGIN
    IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'pgconsistency: invalid invariant name %', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING HINT = 'Use lower-case letters, digits and underscores, starting with a letter (at most 63 characters).';
    END IF;
    SELECT c.relkind INTO v_relkind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pgconsistency' AND c.relname = define_invariant.name;
    IF v_relkind IS NOT NULL AND v_relkind <> 'm' THEN
        RAISE EXCEPTION 'pgconsistency: invariant name % collides with pgconsistency.% (relkind %)', name, name, v_relkind
            USING HINT = 'Choose another name.';
    END IF;

    SELECT i.query_md5 INTO v_existing
      FROM pgconsistency.invariant i
     WHERE i.name = define_invariant.name AND i.view_schema = 'pgconsistency' AND i.view_name = define_invariant.name;

    -- A changed query replaces the view: its DROP waits for a running
    -- refresh of it, with the installer's bounded lock waits.
    IF v_relkind IS NULL OR v_existing IS DISTINCT FROM v_md5 THEN
        IF v_relkind IS NOT NULL THEN
            PERFORM pgconsistency.install_ddl(pg_catalog.format('DROP MATERIALIZED VIEW pgconsistency.%I', name));
        END IF;
        EXECUTE pg_catalog.format('CREATE MATERIALIZED VIEW pgconsistency.%I AS %s WITH NO DATA', name, query);
        EXECUTE pg_catalog.format('CREATE UNIQUE INDEX %I ON pgconsistency.%I (key)', name || '_key', name);
        EXECUTE pg_catalog.format('COMMENT ON MATERIALIZED VIEW pgconsistency.%I IS %L', name,
                                  'pgconsistency invariant ' || name || ': ' || coalesce(description, ''));
    ELSE
        PERFORM pgconsistency.install_comment(pg_catalog.format('pgconsistency.%I', name),
                                              'pgconsistency invariant ' || name || ': ' || coalesce(description, ''));
    END IF;

    PERFORM pgconsistency.register_invariant(name, 'pgconsistency', name, severity, description);
    -- settings are those of a new invariant or of a changed query; re-running
    -- a pack keeps what a DBA changed since.
    UPDATE pgconsistency.invariant i
       SET query_md5 = v_md5,
           settings = CASE WHEN i.query_md5 IS DISTINCT FROM v_md5 THEN coalesce(define_invariant.settings, i.settings)
                           ELSE i.settings END
     WHERE i.name = define_invariant.name
       AND i.query_md5 IS DISTINCT FROM v_md5;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.define_invariant(text, text, text, text, jsonb) IS
  'Create or replace the materialized view pgconsistency.<name> from a query and register it as an invariant';

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
-- changes the type of a column of an application table. The invariant views
-- depend on the tables they read, so PostgreSQL refuses such a migration
-- ("cannot drop table … because other objects depend on it"). This drops the
-- views of define_invariant() that read the table, with the installer's
-- bounded lock waits, and returns their names; run install.sql (or the pack
-- that defined them) after the migration, and it creates them again, empty
-- until their next refresh. Their anomalies, acknowledgements, parameters
-- and refresh state are kept; until then their refreshes fail with "does not
-- exist", which pgconsistency.refresh.failures shows. Views registered with
-- register_invariant() are not dropped: a NOTICE names them.
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
    v_status   text := 'succeeded';
    v_error    text;
    v_hint     text;
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

    -- Bounded waits: a refresh must never queue writers behind it. REFRESH
    -- CONCURRENTLY takes only an EXCLUSIVE lock on the view (reads go on)
    -- and ACCESS SHARE on the tables it reads.
    PERFORM pg_catalog.set_config('lock_timeout', (EXTRACT(epoch FROM inv.lock_timeout) * 1000)::bigint::text, true);

    BEGIN
        PERFORM pgconsistency.apply_refresh_settings(inv.settings);

        SELECT c.relispopulated INTO v_populated
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = inv.view_schema AND c.relname = inv.view_name AND c.relkind = 'm';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'materialized view %.% does not exist', inv.view_schema, inv.view_name
                USING HINT = 'Re-run sql/install.sql, or unregister the invariant.';
        END IF;

        -- CONCURRENTLY needs a populated view; the first refresh populates it.
        IF v_populated THEN
            EXECUTE pg_catalog.format('REFRESH MATERIALIZED VIEW CONCURRENTLY %I.%I', inv.view_schema, inv.view_name);
        ELSE
            EXECUTE pg_catalog.format('REFRESH MATERIALIZED VIEW %I.%I', inv.view_schema, inv.view_name);
        END IF;

        -- New anomalies take their seqs (the order of the log records) under
        -- a lock held until this transaction commits: seqs then become
        -- visible in increasing order, so a log consumer that has read up to
        -- seq N never meets a smaller one later, whatever the refreshes
        -- running at the same time (nextval alone does not order commits).
        -- Concurrent refreshes queue here for the lifecycle step only.
        PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.anomaly_seq'), 0);

        -- The lifecycle step joins the view with pgconsistency.anomaly, whose
        -- statistics a mass incident has just made wrong (100,000 anomalies
        -- inserted by the previous refresh, not analysed yet). Under the
        -- invariant's own planner settings (enable_hashjoin off, say, meant
        -- for its query) the planner then chose nested loops over the view's
        -- rows: quadratic, a refresh that never ended. So the invariant's
        -- settings go back to the server's, and no nested loop is planned:
        -- the joins are hash or merge joins, linear whatever the statistics.
        PERFORM pg_catalog.set_config(e.key, s.reset_val, true)
           FROM pg_catalog.jsonb_each_text(inv.settings) AS e
           JOIN pg_catalog.pg_settings s ON s.name = e.key;
        PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);

        -- Update the anomalies' lifecycle: O(anomalies), the application
        -- tables are not read again. The CTEs see the same snapshot and touch
        -- disjoint rows: still open (last seen now), new or back again,
        -- resolved (open but gone from the view).
        EXECUTE pg_catalog.format($q$
            WITH cur AS (SELECT v.key, pg_catalog.to_jsonb(v) - 'key' AS details FROM %I.%I v),
            seen AS (
                UPDATE pgconsistency.anomaly a SET last_seen_at = $2
                  FROM cur
                 WHERE a.invariant = $1 AND a.key = cur.key AND a.resolved_at IS NULL
                RETURNING 1),
            appeared AS (
                INSERT INTO pgconsistency.anomaly AS a (invariant, key, seq, first_seen_at, last_seen_at, details)
                SELECT $1, cur.key, pg_catalog.nextval('pgconsistency.anomaly_seq'), $2, $2, cur.details
                  FROM cur
                 WHERE NOT EXISTS (SELECT 1 FROM pgconsistency.anomaly o
                                    WHERE o.invariant = $1 AND o.key = cur.key AND o.resolved_at IS NULL)
                ON CONFLICT ON CONSTRAINT anomaly_pkey DO UPDATE
                   SET seq = EXCLUDED.seq, first_seen_at = EXCLUDED.first_seen_at,
                       last_seen_at = EXCLUDED.last_seen_at, resolved_at = NULL, details = EXCLUDED.details,
                       acknowledged_at = NULL, acknowledged_by = NULL, ack_reason = NULL, ack_until = NULL
                RETURNING 1),
            resolved AS (
                UPDATE pgconsistency.anomaly a SET resolved_at = $2
                 WHERE a.invariant = $1 AND a.resolved_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM cur WHERE cur.key = a.key)
                RETURNING 1)
            SELECT (SELECT count(*) FROM appeared), (SELECT count(*) FROM resolved)
        $q$, inv.view_schema, inv.view_name)
        INTO v_new, v_resolved
        USING inv.name, v_started;
        SELECT c.open, c.acknowledged INTO v_total, v_acked FROM pgconsistency.open_counts(inv.name) c;
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
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT, v_state = RETURNED_SQLSTATE;
            IF v_state = '55P03' THEN -- lock_not_available: lock_timeout
                v_status := 'timed_out';
                v_error := pg_catalog.format('%s: waited longer than the invariant''s lock_timeout (%s) for a lock held by another session',
                                             v_error, inv.lock_timeout);
                v_hint := 'A long transaction or DDL on the tables the invariant reads holds the lock; the next refresh tries again.';
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
                acknowledged_anomalies, consecutive_failures)
        VALUES (inv.name, 'succeeded', v_started, v_finished,
                EXTRACT(epoch FROM v_finished - v_started)::double precision, NULL,
                v_finished, EXTRACT(epoch FROM v_finished - v_started)::double precision,
                v_total, v_new, v_resolved, v_acked, 0)
        ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
           SET last_status = EXCLUDED.last_status, last_started_at = EXCLUDED.last_started_at,
               last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
               last_error = NULL, refreshed_at = EXCLUDED.refreshed_at,
               refresh_duration_seconds = EXCLUDED.refresh_duration_seconds,
               anomalies = EXCLUDED.anomalies, new_anomalies = EXCLUDED.new_anomalies,
               resolved_anomalies = EXCLUDED.resolved_anomalies,
               acknowledged_anomalies = EXCLUDED.acknowledged_anomalies, consecutive_failures = 0;
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
-- Re-created only when its definition changed: DROP VIEW takes an ACCESS
-- EXCLUSIVE lock that would queue the readers behind it on every deploy. The
-- definition is compared through a temporary view of the new one (both
-- deparsed by PostgreSQL, with every name qualified). The grants on the view
-- (to pgconsistency_reader, see sql/roles.sql) are given back after a
-- re-creation.
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
       pgconsistency.version()                   AS version
  FROM pgconsistency.invariant i
  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
$def$;
    v_acl aclitem[];
    g record;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE 'CREATE TEMPORARY VIEW pgconsistency_status_next AS ' || v_def;
    IF pg_catalog.to_regclass('pgconsistency.status') IS NOT NULL
       AND pg_catalog.pg_get_viewdef(pg_catalog.to_regclass('pgconsistency.status'))
           = pg_catalog.pg_get_viewdef(pg_catalog.to_regclass('pg_temp.pgconsistency_status_next')) THEN
        DROP VIEW pg_temp.pgconsistency_status_next;
        RETURN;
    END IF;
    DROP VIEW pg_temp.pgconsistency_status_next;

    SELECT c.relacl INTO v_acl FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass('pgconsistency.status');
    IF pg_catalog.to_regclass('pgconsistency.status') IS NOT NULL THEN
        PERFORM pgconsistency.install_ddl('DROP VIEW pgconsistency.status');
    END IF;
    EXECUTE 'CREATE VIEW pgconsistency.status AS ' || v_def;
    COMMENT ON VIEW pgconsistency.status IS
      'One row per registered invariant: latest snapshot counts and refresh outcome (cheap: reads stored state only)';
    FOR g IN
        SELECT a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END AS grantee
          FROM pg_catalog.aclexplode(v_acl) a
         WHERE a.grantee <> (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass('pgconsistency.status'))
    LOOP
        EXECUTE pg_catalog.format('GRANT %s ON pgconsistency.status TO %s%s', g.privilege_type, g.grantee,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
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
