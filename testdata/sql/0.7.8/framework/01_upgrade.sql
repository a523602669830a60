-- pgconsistency framework: upgrades in place of an install of an earlier
-- release, one section per release, each step a no-op that takes no lock
-- once done (install.sql runs on every deployment). On a fresh install
-- nothing here finds anything to do.
--
-- This file runs before the tables and functions of this release are
-- created (02_tables.sql and after): what it renames is then replaced in
-- place (CREATE OR REPLACE keeps a function's grants and what depends on
-- it), and what it adds to a table is there for the functions and views
-- that read it. CREATE TABLE IF NOT EXISTS in 02_tables.sql creates only the
-- tables an earlier release did not have, so the columns a release added
-- to an existing table are added here.
--
-- Elsewhere, also for upgrades: 02_tables.sql creates the indexes an older
-- install lacks (_install_index); 10_privileges.sql gives the refresher role
-- the functions a release added to the refresh loop; install.sql runs
-- _upgrade_defined_views() and _install_capture() after the packs.

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

-- ---------------------------------------------------------------------------
-- From 0.3.0 (and every earlier release): the internal functions are named
-- with a leading underscore. First, because everything after this uses the
-- new names. A function is renamed, not dropped, so that what depends on it
-- keeps working: the CHECK constraint invariant_settings_valid calls
-- _valid_refresh_settings, and the capture triggers on the application's
-- tables call the generated _capture_<table oid> functions (renaming them
-- takes no lock on those tables; _install_capture then replaces their text).
-- The _install_* helpers, created by 00_schema.sql just before, replace
-- their old namesakes, which are dropped.
DO $do$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS old, '_' || p.proname AS new_name,
               pg_catalog.to_regprocedure(pg_catalog.format('pgconsistency.%I(%s)', '_' || p.proname,
                                                            pg_catalog.oidvectortypes(p.proargtypes))) AS existing
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgconsistency'::regnamespace
           AND (p.proname IN ('install_ddl', 'install_comment', 'install_column', 'install_index', 'install_view',
                              'register_row', 'query_shape', 'anomaly_view_sql', 'copy_snapshot', 'upgrade_defined_views',
                              'valid_refresh_settings', 'apply_refresh_settings', 'refresh_due',
                              'open_counts', 'recount', 'acknowledge_open', 'log_cursor_owned',
                              'reconcile_reason_started', 'reconcile_reason_changed', 'reconcile_reason',
                              'check_incremental', 'install_capture', 'dispatch_captured_keys')
                OR p.proname ~ '^capture_[0-9]+$')
         ORDER BY p.proname
    LOOP
        IF f.existing IS NULL THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s RENAME TO %I', f.old, f.new_name);
        ELSE
            EXECUTE pg_catalog.format('DROP FUNCTION %s', f.old);
        END IF;
    END LOOP;
END
$do$;

-- ---------------------------------------------------------------------------
-- Before 0.1.0: columns and a constraint that 0.1.0 itself added to the
-- installs made during its development, and their old signatures.
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant') IS NULL THEN
        RETURN; -- a fresh install: 02_tables.sql creates the tables whole
    END IF;
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'settings', $$jsonb NOT NULL DEFAULT '{}'::jsonb$$);
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'after_refresh', 'text');
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                    WHERE conrelid = 'pgconsistency.invariant'::regclass AND conname = 'invariant_settings_valid') THEN
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.invariant ADD CONSTRAINT invariant_settings_valid
            CHECK (pgconsistency._valid_refresh_settings(settings))');
    END IF;
END
$do$;
-- CREATE OR REPLACE cannot change a signature: the old ones go.
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text);
DROP FUNCTION IF EXISTS pgconsistency.refresh_invariant(text);
DROP PROCEDURE IF EXISTS pgconsistency.refresh(text);

-- ---------------------------------------------------------------------------
-- From 0.1.0 to 0.2.0: the retention of resolved anomalies, and owners of
-- log cursors (NULL for the cursors of 0.1.0: the next role to use one
-- becomes its owner). The indexes 0.2.0 added to pgconsistency.anomaly
-- are created by 02_tables.sql; refresh_plan(), which 0.2.0 added to the
-- refresh loop, is granted to pgconsistency_refresher by 10_privileges.sql.
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'resolved_retention',
      $$interval NOT NULL DEFAULT '30 days' CONSTRAINT invariant_resolved_retention_positive CHECK (resolved_retention > interval '0')$$);
    PERFORM pgconsistency._install_column('pgconsistency.log_cursor', 'owner', 'text');
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.2.0 to 0.3.0: the refresh engine. The registry keeps the query the
-- framework runs and the refresh mode (see the invariant table in
-- 02_tables.sql); the refresh state says what kind each refresh was and
-- what the reconciles healed. The tables of the capture are new: created by
-- 02_tables.sql.
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'query', 'text');
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'relations', 'text[]');
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'refresh_mode',
      $$text NOT NULL DEFAULT 'full' CONSTRAINT invariant_refresh_mode_valid CHECK (refresh_mode IN ('full', 'incremental'))$$);
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'full_refresh_period',
      $$interval NOT NULL DEFAULT '1 day' CONSTRAINT invariant_full_refresh_period_positive CHECK (full_refresh_period > interval '0')$$);
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'incremental_max_keys',
      $$bigint NOT NULL DEFAULT 20000 CONSTRAINT invariant_incremental_max_keys_positive CHECK (incremental_max_keys > 0)$$);
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'last_refresh_kind',
      $$text CONSTRAINT refresh_state_kind_valid CHECK (last_refresh_kind IN ('full', 'incremental', 'reconcile'))$$);
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'last_full_refresh_at', 'timestamptz');
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'rechecked_keys', 'bigint NOT NULL DEFAULT 0');
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'healed_anomalies', 'bigint NOT NULL DEFAULT 0');
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'last_healed_at', 'timestamptz');
    -- key_lookup came late in the development of 0.3.0
    IF pg_catalog.to_regclass('pgconsistency.invariant_key_source') IS NOT NULL THEN
        PERFORM pgconsistency._install_column('pgconsistency.invariant_key_source', 'key_lookup', 'text');
    END IF;
END
$do$;
-- define_invariant of 0.1.0 and 0.2.0, without keys.
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text, jsonb);

-- The views of invariants that 0.1.0 and 0.2.0 made with define_invariant
-- were materialized views; since 0.3.0 they are plain views of the open
-- anomalies. define_invariant replaces the view of each invariant a pack
-- defines again (copying the snapshot first); _upgrade_defined_views, run by
-- install.sql after the packs, the others.
-- _copy_snapshot: the rows of the populated materialized view
-- pgconsistency.<invariant> of a release before 0.3.0 into the details of
-- the invariant's open anomalies, before define_invariant replaces the view
-- (those releases wrote details only when an anomaly appeared).
CREATE OR REPLACE FUNCTION pgconsistency._copy_snapshot(invariant text) RETURNS void
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
COMMENT ON FUNCTION pgconsistency._copy_snapshot(text) IS
  'Internal: for upgrades from before 0.3.0, copy a materialized view''s rows into the details of its open anomalies';

-- _upgrade_defined_views: the invariants an older release made with
-- define_invariant whose definition nobody ran again since the upgrade (a
-- user's own, say): their materialized views become the views of 0.3.0,
-- from the view's definition as PostgreSQL keeps it. query_md5 stays that
-- of the original text, so running the original define_invariant again
-- changes nothing but the text kept. install.sql runs it after the packs.
CREATE OR REPLACE FUNCTION pgconsistency._upgrade_defined_views() RETURNS SETOF text
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
        v_shape := pgconsistency._query_shape(v_query);
        PERFORM pgconsistency._copy_snapshot(i.name);
        PERFORM pgconsistency._install_view(pg_catalog.format('pgconsistency.%I', i.name),
            pgconsistency._anomaly_view_sql(i.name, v_shape.columns, v_shape.key_collation),
            'pgconsistency invariant ' || i.name || ': ' || coalesce(i.description, '') || ' (its open anomalies as of the latest refresh)');
        UPDATE pgconsistency.invariant r SET query = v_query, relations = v_shape.relations WHERE r.name = i.name;
        RETURN NEXT i.name;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._upgrade_defined_views() IS
  'Internal: for upgrades from before 0.3.0, turn the remaining materialized views of define_invariant into 0.3.0 views';

-- ---------------------------------------------------------------------------
-- From 0.3.0 to 0.4.0: one word per concept. Columns are renamed in place
-- (what depends on them follows); the names users read before keep working
-- until 0.8.0: the status view's as columns that raise a NOTICE
-- (09_status.sql), the anomaly table's as read-only generated columns
-- (adding them rewrites pgconsistency.anomaly once, with the installer's
-- bounded lock waits).
DO $do$
DECLARE
    has_column boolean;
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.refresh_state') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = 'pgconsistency.refresh_state'::regclass AND a.attname = 'last_status' AND NOT a.attisdropped) THEN
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.refresh_state RENAME COLUMN last_status TO last_run_outcome');
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                WHERE conrelid = 'pgconsistency.refresh_state'::regclass AND conname = 'refresh_state_status_valid') THEN
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.refresh_state RENAME CONSTRAINT refresh_state_status_valid TO refresh_state_run_outcome_valid');
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = 'pgconsistency.refresh_state'::regclass AND a.attname = 'refresh_duration_seconds' AND NOT a.attisdropped) THEN
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.refresh_state RENAME COLUMN refresh_duration_seconds TO snapshot_duration_seconds');
    END IF;
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = 'pgconsistency.anomaly'::regclass AND a.attname = 'ack_reason'
                      AND NOT a.attisdropped AND a.attgenerated = '') INTO has_column;
    IF has_column THEN
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.anomaly RENAME COLUMN ack_reason TO acknowledged_reason');
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.anomaly RENAME COLUMN ack_until TO acknowledged_until');
        PERFORM pgconsistency._install_ddl('ALTER TABLE pgconsistency.anomaly
            ADD COLUMN ack_reason text GENERATED ALWAYS AS (acknowledged_reason) STORED,
            ADD COLUMN ack_until timestamptz GENERATED ALWAYS AS (acknowledged_until) STORED');
    END IF;
    IF pg_catalog.to_regclass('pgconsistency.anomaly_ack_until') IS NOT NULL THEN
        PERFORM pgconsistency._install_ddl('ALTER INDEX pgconsistency.anomaly_ack_until RENAME TO anomaly_acknowledged_until');
    END IF;
    -- _open_counts's first OUT parameter was "open" (open and not
    -- acknowledged, while "open" means not resolved everywhere else); CREATE
    -- OR REPLACE cannot rename an OUT parameter.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                WHERE p.oid = pg_catalog.to_regprocedure('pgconsistency._open_counts(text)') AND 'open' = ANY (p.proargnames)) THEN
        DROP FUNCTION pgconsistency._open_counts(text);
    END IF;
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.4.0 to 0.5.0: owners. Each invariant gets an optional owner (the
-- team its alerts are routed to) and runbook_url; both NULL (unset) in an
-- upgraded install until a pack's definition or set_owner() sets them.
-- define_invariant(), register_invariant() and their internal _register_row
-- take them as new parameters: CREATE OR REPLACE cannot change a
-- signature, so the old ones go (callers' positional and named arguments
-- keep working: the new parameters come last, with defaults).
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'owner',
      $$text CONSTRAINT invariant_owner_valid CHECK (owner ~ '^\S(.*\S)?$' AND owner !~ '[[:cntrl:]]' AND pg_catalog.length(owner) <= 128)$$);
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'runbook_url',
      $$text CONSTRAINT invariant_runbook_url_valid CHECK (runbook_url ~ '^https?://\S+$' AND pg_catalog.length(runbook_url) <= 2048)$$);
END
$do$;
DROP FUNCTION IF EXISTS pgconsistency.define_invariant(text, text, text, text, jsonb, jsonb);
DROP FUNCTION IF EXISTS pgconsistency.register_invariant(text, text, text, text, text);
DROP FUNCTION IF EXISTS pgconsistency._register_row(text, text, text, text, text);

-- ---------------------------------------------------------------------------
-- From 0.5.0 to 0.6.0: which deployment broke it. Each anomaly records the
-- deployment current when it appeared and the change that caused it (see
-- 02_tables.sql); each log cursor, where its consumer is in the finished
-- refresh requests. The index anomaly_first_seen is created by 02_tables.sql. Nullable columns without a default: adding them rewrites
-- nothing. The anomalies open before the upgrade have them NULL (unknown).
DO $do$
DECLARE
    c record;
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.anomaly') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    FOR c IN SELECT * FROM (VALUES ('deployment_id', 'bigint'), ('deployed_since_previous_refresh', 'boolean'), ('refresh_reason', 'text'),
                                   ('cause_audit_id', 'bigint'), ('cause_operation', 'text'), ('cause_table', 'text'),
                                   ('cause_txid', 'bigint'), ('cause_changed_at', 'timestamptz'),
                                   ('cause_db_user', 'text'), ('cause_application_name', 'text')) AS v(col, type)
    LOOP
        PERFORM pgconsistency._install_column('pgconsistency.anomaly', c.col, c.type);
    END LOOP;
    -- where the latest refresh's new anomalies came from (status view)
    FOR c IN SELECT * FROM (VALUES ('new_deployment_id', 'bigint'), ('new_deploy_marker', 'text'),
                                   ('new_deployed_at', 'timestamptz'), ('new_deployed_since_previous_refresh', 'boolean'),
                                   ('new_causes', 'bigint'), ('new_cause_audit_id', 'bigint'),
                                   ('new_cause_operation', 'text'), ('new_cause_table', 'text'), ('new_cause_txid', 'bigint'),
                                   ('new_cause_changed_at', 'timestamptz'), ('new_cause_db_user', 'text'),
                                   ('new_cause_application_name', 'text')) AS v(col, type)
    LOOP
        PERFORM pgconsistency._install_column('pgconsistency.refresh_state', c.col, c.type);
    END LOOP;
    -- Each log consumer's cursor in the finished refresh requests
    -- (finished_requests_for_log): NULL until it first reads them.
    PERFORM pgconsistency._install_column('pgconsistency.log_cursor', 'last_request_id', 'bigint');
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.6.0 to 0.7.0: the WAL capture and changes refreshed within
-- seconds. pgconsistency.capture is created by 02_tables.sql (trigger
-- capture, as before). Each invariant gets incremental_period (how often at
-- most the changes to its tables are refreshed; constant default: adding it
-- rewrites nothing); refresh_state, the index hint of the latest
-- incremental refresh.
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant') IS NULL THEN
        RETURN; -- a fresh install
    END IF;
    PERFORM pgconsistency._install_column('pgconsistency.invariant', 'incremental_period',
      $$interval NOT NULL DEFAULT '2 seconds' CONSTRAINT invariant_incremental_period_positive CHECK (incremental_period > interval '0')$$);
    PERFORM pgconsistency._install_column('pgconsistency.refresh_state', 'incremental_index_hint', 'text');
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.7.3 to 0.7.4: the WAL capture's read takes a key column by its
-- place in the decoded row (_wal_column_value(regclass, text)); the one of
-- 0.7.3, which searched by name only, goes.
DROP FUNCTION IF EXISTS pgconsistency._wal_column_value(text);

-- ---------------------------------------------------------------------------
-- From 0.7.4 to 0.7.5: an UPDATE that leaves every column an invariant
-- reads as it was gives the invariant no key. The key sources get the
-- columns read (read_columns: NULL, every column, until define_invariant
-- runs again; the packs of install.sql do), the captured keys the columns
-- they are for (NULL: every invariant of their source, as before). The
-- WAL capture keeps the statement of its reads (capture.read_statement).
-- _wal_column_value takes the row it reads from (a new or an old one).
DROP FUNCTION IF EXISTS pgconsistency._wal_column_value(regclass, text);
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.invariant_key_source') IS NOT NULL THEN
        PERFORM pgconsistency._install_column('pgconsistency.invariant_key_source', 'read_columns', 'text[]');
    END IF;
    IF pg_catalog.to_regclass('pgconsistency.captured_key') IS NOT NULL THEN
        PERFORM pgconsistency._install_column('pgconsistency.captured_key', 'read_columns', 'text[]');
    END IF;
    IF pg_catalog.to_regclass('pgconsistency.capture') IS NOT NULL THEN
        PERFORM pgconsistency._install_column('pgconsistency.capture', 'read_statement', 'text');
    END IF;
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.7.5 to 0.7.6: the WAL capture's read takes each decoded row's key
-- with one CASE over the sources (_wal_key_expression) instead of a SELECT
-- per source. install.sql's _install_capture empties
-- capture.read_statement (as at every run): the next read builds it again.
DROP FUNCTION IF EXISTS pgconsistency._wal_key_select(integer, regclass, text);

-- ---------------------------------------------------------------------------
-- From 0.7.6 to 0.7.7: the receiver may read the WAL capture's slot over a
-- replication connection (capture_wal_stream, wal_stream_start); the
-- capture records who read it last (capture.read_by).
DO $do$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.capture') IS NOT NULL THEN
        PERFORM pgconsistency._install_column('pgconsistency.capture', 'read_by', 'text');
    END IF;
END
$do$;

-- ---------------------------------------------------------------------------
-- From 0.7.7 to 0.7.8: an incremental refresh runs its query without JIT
-- (_refresh_rows_incremental, replaced by 08_refresh.sql), and
-- _wal_drop_slot leaves a slot a walsender holds (replaced by
-- 07_wal_capture.sql). Nothing stored changes.
