-- pgconsistency audit trail pack (optional; not part of install.sql).
--
--   psql -v ON_ERROR_STOP=1 -d DB -f sql/audit.sql
--   psql -d DB -c 'SELECT pgconsistency.enable_dataset_audit()'
--
-- Trigger-based row history for chosen tables: every INSERT, UPDATE and
-- DELETE (old and new row as jsonb) and every TRUNCATE, with the transaction,
-- the time, the database user, application_name, client address and
-- statement. When an invariant finds a dataset that lost a row, the history
-- says which statement removed it, when and from where, and holds the row to
-- put back. Meant for small, critical metadata tables: each audited row change
-- costs one more insert (see docs/audit.md for the measured overhead).
--
-- Run it after sql/install.sql. Idempotent: re-running keeps the history and
-- the triggers of the audited tables. The whole file is one transaction.

\set ON_ERROR_STOP 1
\set QUIET on
SET client_min_messages = warning;

BEGIN;
\o /dev/null

DO $check$
BEGIN
    IF pg_catalog.to_regprocedure('pgconsistency._install_view(text, text, text)') IS NULL THEN
        RAISE EXCEPTION 'pgconsistency is not installed (or is older than this pack) in database %', pg_catalog.current_database()
            USING HINT = 'Run sql/install.sql first, then sql/audit.sql.';
    END IF;
END
$check$;

-- The history. One row per row change (per statement for TRUNCATE). Written
-- only by pgconsistency._audit_trigger(), which runs as the owner of this
-- table: application roles need no privilege on it, and cannot edit it.
CREATE TABLE IF NOT EXISTS pgconsistency.audit_log (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema     text        NOT NULL,
    table_name       text        NOT NULL,
    -- INSERT, UPDATE, DELETE or TRUNCATE (TG_OP). No CHECK constraint: the
    -- trigger is the only writer, and each audited row runs an INSERT of its
    -- own, which would parse and evaluate the constraint again (2-3 us a row).
    operation        text        NOT NULL,
    -- the value of the table's key column (enable_audit's key_column) in the
    -- row after the change (before it, for a DELETE): what audit_history()
    -- looks up. NULL for TRUNCATE and for tables audited without a key column.
    row_key          text,
    -- set only by an UPDATE that changed the key: the key before the change,
    -- so the history of the old key still finds the row.
    old_row_key      text,
    old_row          jsonb,      -- UPDATE, DELETE
    new_row          jsonb,      -- INSERT, UPDATE
    txid             bigint      NOT NULL, -- txid_current(): groups the changes of one transaction
    -- clock_timestamp() when the trigger ran: just after the statement that
    -- made the change (AFTER triggers run at its end). Not now(), the start of
    -- the transaction: a migration may run for an hour in one transaction.
    changed_at       timestamptz NOT NULL,
    db_user          text        NOT NULL, -- session_user: the role that logged in
    db_role          text,                 -- the role set with SET ROLE, NULL if none
    application_name text,
    client_addr      inet,                 -- NULL over the unix socket
    statement        text                  -- current_query(), the top-level statement, cut at 1000 characters
);
SELECT pgconsistency._install_comment('pgconsistency.audit_log',
  'pgconsistency audit trail: row history of the tables audited with pgconsistency.enable_audit()');

-- Every index is paid on every audited row change, so there are few.
-- "What happened to key K": audit_history(). The partial indexes get almost
-- no entries (few rows have an old_row_key or are TRUNCATEs). Created only
-- when missing (audit_log takes the application's writes: CREATE INDEX IF
-- NOT EXISTS would lock it before checking).
SELECT pgconsistency._install_index('audit_log_row_key',
  'CREATE INDEX audit_log_row_key ON pgconsistency.audit_log (row_key, changed_at) WHERE row_key IS NOT NULL');
SELECT pgconsistency._install_index('audit_log_old_row_key',
  'CREATE INDEX audit_log_old_row_key ON pgconsistency.audit_log (old_row_key) WHERE old_row_key IS NOT NULL');
SELECT pgconsistency._install_index('audit_log_truncate',
  $$CREATE INDEX audit_log_truncate ON pgconsistency.audit_log (changed_at) WHERE operation = 'TRUNCATE'$$);
-- "What happened since time X" (add the table as a filter), and pruning.
SELECT pgconsistency._install_index('audit_log_changed_at',
  'CREATE INDEX audit_log_changed_at ON pgconsistency.audit_log (changed_at)');

-- The audited tables, maintained by enable_audit() and disable_audit().
-- By name, like pgconsistency.invariant: a table dropped and re-created by a
-- migration keeps its entry.
CREATE TABLE IF NOT EXISTS pgconsistency.audited_table (
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    key_column   text,
    enabled_at   timestamptz NOT NULL DEFAULT now(),
    enabled_by   text        NOT NULL DEFAULT session_user,
    PRIMARY KEY (table_schema, table_name)
);
SELECT pgconsistency._install_comment('pgconsistency.audited_table',
  'Tables whose row changes pgconsistency.audit_log records; see enable_audit() and disable_audit()');

REVOKE ALL ON pgconsistency.audit_log, pgconsistency.audited_table FROM PUBLIC;

-- Upgrades: before 0.4.0 the pack's internal functions had no leading
-- underscore. Renamed in place: the triggers on the audited tables keep
-- calling the same function.
DO $do$
BEGIN
    IF pg_catalog.to_regprocedure('pgconsistency.audit_trigger()') IS NOT NULL
       AND pg_catalog.to_regprocedure('pgconsistency._audit_trigger()') IS NULL THEN
        ALTER FUNCTION pgconsistency.audit_trigger() RENAME TO _audit_trigger;
    END IF;
    IF pg_catalog.to_regprocedure('pgconsistency.drop_audit_triggers(regclass)') IS NOT NULL
       AND pg_catalog.to_regprocedure('pgconsistency._drop_audit_triggers(regclass)') IS NULL THEN
        ALTER FUNCTION pgconsistency.drop_audit_triggers(regclass) RENAME TO _drop_audit_triggers;
    END IF;
END
$do$;

-- _audit_trigger: writes one audit_log row. The row trigger passes the key
-- column as its argument (none: no key). SECURITY DEFINER so that the roles
-- writing the audited tables need no grant on audit_log; the search_path is
-- pinned, as every SECURITY DEFINER function's must be. session_user and the
-- role GUC are unaffected by SECURITY DEFINER (current_user would be this
-- function's owner), so they still name who made the change.
CREATE OR REPLACE FUNCTION pgconsistency._audit_trigger()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_key_column text := TG_ARGV[0];
    v_old        jsonb;
    v_new        jsonb;
    v_key        text;
    v_old_key    text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- Statement level: the removed rows are not read (that would make a
        -- TRUNCATE as slow as a DELETE); backups hold them.
        NULL;
    ELSE
        IF TG_OP <> 'INSERT' THEN
            v_old := pg_catalog.to_jsonb(OLD);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            v_new := pg_catalog.to_jsonb(NEW);
        END IF;
        IF v_key_column IS NOT NULL THEN
            v_key := coalesce(v_new, v_old) ->> v_key_column;
            IF TG_OP = 'UPDATE' AND (v_old ->> v_key_column) IS DISTINCT FROM v_key THEN
                v_old_key := v_old ->> v_key_column;
            END IF;
        END IF;
    END IF;

    INSERT INTO pgconsistency.audit_log
           (table_schema, table_name, operation, row_key, old_row_key, old_row, new_row,
            txid, changed_at, db_user, db_role, application_name, client_addr, statement)
    VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, v_key, v_old_key, v_old, v_new,
            pg_catalog.txid_current(), pg_catalog.clock_timestamp(),
            session_user, NULLIF(pg_catalog.current_setting('role'), 'none'),
            pg_catalog.current_setting('application_name'), pg_catalog.inet_client_addr(),
            pg_catalog.left(pg_catalog.current_query(), 1000));
    RETURN NULL; -- AFTER trigger: the result is ignored
END
$fn$;
COMMENT ON FUNCTION pgconsistency._audit_trigger() IS
  'Internal: the audit trigger of pgconsistency.enable_audit(); writes pgconsistency.audit_log';
-- Firing a trigger needs no EXECUTE privilege, creating one does: this keeps
-- other roles from attaching it to tables of their own to write the log.
REVOKE ALL ON FUNCTION pgconsistency._audit_trigger() FROM PUBLIC;

-- _drop_audit_triggers: internal to enable_audit() and disable_audit(). Drops
-- only the triggers that exist (DROP TRIGGER IF EXISTS would say NOTICE for
-- the others, on every first enable).
CREATE OR REPLACE FUNCTION pgconsistency._drop_audit_triggers(target regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_name name;
BEGIN
    FOR v_name IN SELECT t.tgname FROM pg_catalog.pg_trigger t
                   WHERE t.tgrelid = target AND NOT t.tgisinternal
                     AND t.tgname IN ('pgconsistency_audit', 'pgconsistency_audit_truncate')
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', v_name, target);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._drop_audit_triggers(regclass) IS
  'Internal: drop the audit triggers of a table, those that exist (for enable_audit and disable_audit)';

-- enable_audit: record every row change of target in audit_log from now on.
-- key_column (optional) names the column whose value audit_history() looks up:
-- for the dataset tables, the dataset id that the dataset invariants report as
-- their key. Re-running replaces the triggers (e.g. to change the key column).
-- Takes a brief SHARE ROW EXCLUSIVE lock on target (it waits for running
-- writes, and blocks new ones until commit): set lock_timeout on a busy table.
CREATE OR REPLACE FUNCTION pgconsistency.enable_audit(target regclass, key_column text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema  text;
    v_table   text;
    v_relkind "char";
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_table, v_relkind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = target;
    IF v_relkind IS NULL OR v_relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgconsistency: % is not a table; only tables can be audited', coalesce(target::text, 'NULL');
    END IF;
    IF target = 'pgconsistency.audit_log'::regclass THEN
        RAISE EXCEPTION 'pgconsistency: the audit log cannot audit itself';
    END IF;
    IF key_column IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = target AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pgconsistency: table %.% has no column %', v_schema, v_table, pg_catalog.quote_ident(key_column)
            USING HINT = 'Pass the column that holds the key the invariants report, e.g. key_column => ''dataset_id''.';
    END IF;

    -- Drop and create rather than CREATE OR REPLACE TRIGGER (PostgreSQL 14+):
    -- same effect in this transaction, and it works on older servers.
    PERFORM pgconsistency._drop_audit_triggers(target);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER pgconsistency_audit AFTER INSERT OR UPDATE OR DELETE ON %I.%I
           FOR EACH ROW EXECUTE FUNCTION pgconsistency._audit_trigger(%s)',
        v_schema, v_table, coalesce(pg_catalog.quote_literal(key_column), ''));
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER pgconsistency_audit_truncate AFTER TRUNCATE ON %I.%I
           FOR EACH STATEMENT EXECUTE FUNCTION pgconsistency._audit_trigger()',
        v_schema, v_table);

    INSERT INTO pgconsistency.audited_table AS a (table_schema, table_name, key_column, enabled_at, enabled_by)
    VALUES (v_schema, v_table, key_column, pg_catalog.now(), session_user)
    ON CONFLICT ON CONSTRAINT audited_table_pkey DO UPDATE
       SET key_column = EXCLUDED.key_column, enabled_at = EXCLUDED.enabled_at, enabled_by = EXCLUDED.enabled_by;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.enable_audit(regclass, text) IS
  'Record every row change of a table in pgconsistency.audit_log, keyed by key_column';

-- disable_audit: stop recording target. Its history stays in audit_log.
CREATE OR REPLACE FUNCTION pgconsistency.disable_audit(target regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema text;
    v_table  text;
BEGIN
    SELECT n.nspname, c.relname INTO v_schema, v_table
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = target;
    PERFORM pgconsistency._drop_audit_triggers(target);
    DELETE FROM pgconsistency.audited_table a WHERE a.table_schema = v_schema AND a.table_name = v_table;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.disable_audit(regclass) IS
  'Stop recording the row changes of a table; its history stays in pgconsistency.audit_log';

-- enable_dataset_audit: audit the five tables of the dataset invariant pack,
-- each keyed by the dataset id the invariants report (the downstream side for
-- dataset_dependencies, the side derivative_dependencies_missing reports).
CREATE OR REPLACE FUNCTION pgconsistency.enable_dataset_audit(app_schema text DEFAULT 'public')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('dataset_entries', 'dataset_id'),
                                   ('dataset_references', 'dataset_id'),
                                   ('dataset_statistics', 'dataset_id'),
                                   ('dataset_key_blocks', 'dataset_id'),
                                   ('dataset_dependencies', 'downstream_dataset_id')) AS v(table_name, key_column)
    LOOP
        PERFORM pgconsistency.enable_audit(pg_catalog.format('%I.%I', app_schema, t.table_name)::regclass, t.key_column);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.enable_dataset_audit(text) IS
  'Audit the five dataset tables, keyed by dataset id';

-- _invariant_tables: the tables (schema.table, quoted as format('%I.%I'))
-- an invariant reads. Those of an invariant of define_invariant are
-- recorded with it (pgconsistency.invariant.relations, 0.3.0); those of a
-- view of register_invariant are dependencies of its rewrite rule. Views are
-- followed down to their tables.
CREATE OR REPLACE FUNCTION pgconsistency._invariant_tables(invariant text)
RETURNS text[]
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_tables text[];
BEGIN
    WITH RECURSIVE rel(oid) AS (
        SELECT c.oid
          FROM pgconsistency.invariant i
          JOIN pg_catalog.pg_namespace n ON n.nspname = i.view_schema
          JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = i.view_name
         WHERE i.name = _invariant_tables.invariant AND i.relations IS NULL
        UNION ALL
        SELECT pg_catalog.to_regclass(r)::oid
          FROM pgconsistency.invariant i, pg_catalog.unnest(i.relations) AS r
         WHERE i.name = _invariant_tables.invariant AND pg_catalog.to_regclass(r) IS NOT NULL
        UNION
        SELECT d.refobjid
          FROM rel
          JOIN pg_catalog.pg_class v ON v.oid = rel.oid AND v.relkind IN ('v', 'm')
          JOIN pg_catalog.pg_rewrite rw ON rw.ev_class = v.oid
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = rw.oid
                                     AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> v.oid
    )
    SELECT pg_catalog.array_agg(pg_catalog.format('%I.%I', n.nspname, c.relname)) INTO v_tables
      FROM rel
      JOIN pg_catalog.pg_class c ON c.oid = rel.oid AND c.relkind IN ('r', 'p')
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace;
    RETURN coalesce(v_tables, '{}');
END
$fn$;
COMMENT ON FUNCTION pgconsistency._invariant_tables(text) IS
  'Internal: the tables an invariant reads, following views down to their tables';

-- audit_history: the history of one anomaly key, newest first: every audited
-- row change whose key (before or after the change) is key, and every
-- TRUNCATE of an audited table (it removes every key's rows). With invariant,
-- only the tables that invariant's view reads (directly or through other
-- views); with since, only changes from then on.
CREATE OR REPLACE FUNCTION pgconsistency.audit_history(
    key       text,
    since     timestamptz DEFAULT NULL,
    invariant text DEFAULT NULL
) RETURNS SETOF pgconsistency.audit_log
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_tables text[]; -- schema.table of the tables involved; NULL: all
BEGIN
    IF invariant IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = audit_history.invariant) THEN
            RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
                USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
        END IF;
        v_tables := pgconsistency._invariant_tables(invariant);
    END IF;

    -- Three index scans rather than one OR, which would read the whole log.
    -- The branches are disjoint: old_row_key is set only when it differs from
    -- row_key, and a TRUNCATE has neither.
    RETURN QUERY
    SELECT l.*
      FROM (SELECT * FROM pgconsistency.audit_log a WHERE a.row_key = audit_history.key
            UNION ALL
            SELECT * FROM pgconsistency.audit_log a WHERE a.old_row_key = audit_history.key
            UNION ALL
            SELECT * FROM pgconsistency.audit_log a WHERE a.operation = 'TRUNCATE') l
     WHERE (since IS NULL OR l.changed_at >= since)
       AND (v_tables IS NULL OR pg_catalog.format('%I.%I', l.table_schema, l.table_name) = ANY (v_tables))
     ORDER BY l.changed_at DESC, l.id DESC;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.audit_history(text, timestamptz, text) IS
  'Audit history of one anomaly key (e.g. a dataset id), newest first; optionally since a time and only the tables of an invariant';

-- audit_restore: put back the row a DELETE removed (audit_log id), into the
-- table it came from, and return it. Columns missing from the recorded row
-- (added since) get their defaults; generated columns are computed again.
-- Runs with the caller's privileges: it needs INSERT on the table. The insert
-- is audited like any other. Restoring twice fails on the table's unique keys
-- (if it has any), as it should.
CREATE OR REPLACE FUNCTION pgconsistency.audit_restore(audit_id bigint)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    l        pgconsistency.audit_log%ROWTYPE;
    v_target regclass;
    v_cols   text;
    v_row    jsonb;
BEGIN
    SELECT * INTO l FROM pgconsistency.audit_log a WHERE a.id = audit_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: no audit_log row with id %', audit_id;
    END IF;
    IF l.operation <> 'DELETE' THEN
        RAISE EXCEPTION 'pgconsistency: audit_log row % is an %, not a DELETE: there is no removed row to restore', audit_id, l.operation
            USING HINT = 'Its old_row holds the values before the change; write them back with an UPDATE.';
    END IF;
    v_target := pg_catalog.to_regclass(pg_catalog.format('%I.%I', l.table_schema, l.table_name));
    IF v_target IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: table %.% does not exist any more', l.table_schema, l.table_name;
    END IF;

    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO v_cols
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = v_target AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = '' AND l.old_row ? a.attname;

    -- OVERRIDING SYSTEM VALUE: an identity column gets its old value back.
    EXECUTE pg_catalog.format(
        'INSERT INTO %1$I.%2$I AS t (%3$s) OVERRIDING SYSTEM VALUE
         SELECT %3$s FROM pg_catalog.jsonb_populate_record(NULL::%1$I.%2$I, $1)
         RETURNING pg_catalog.to_jsonb(t.*)',
        l.table_schema, l.table_name, v_cols)
    INTO v_row
    USING l.old_row;
    RETURN v_row;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.audit_restore(bigint) IS
  'Re-insert the row removed by the DELETE recorded in pgconsistency.audit_log row audit_id; returns it';

-- audit_causes (0.7.0): this pack's side of the one interface between the
-- refresh and a pack that records changes (pgconsistency._anomaly_causes in
-- sql/framework/08_refresh.sql; its row type pgconsistency.anomaly_cause):
-- for the keys about to become anomalies of invariant, the last audit_log
-- row of each key, in the tables of the invariant this pack records, before
-- until (the refresh's start). One index lookup per key (audit_log_row_key:
-- row_key, changed_at), so a mass incident costs O(new anomalies); none
-- when no table of the invariant is audited: no cause recorded. Before
-- 0.7.0 this was _anomaly_cause_join, SQL text spliced into the refresh.
CREATE OR REPLACE FUNCTION pgconsistency.audit_causes(invariant text, keys text[], until timestamptz)
RETURNS SETOF pgconsistency.anomaly_cause
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
-- The refresh calls it under the lifecycle's planner settings (nested
-- loops off): the catalog queries of _invariant_tables then cost 1e10 and
-- were JIT-compiled, 1 s per refresh instead of 6 ms; and the lookups are
-- a nested loop by design. Its own settings, whatever the caller's:
SET enable_nestloop = on
SET enable_hashjoin = on
SET enable_mergejoin = on
SET jit = off
AS $fn$
DECLARE
    v_tables text[];
BEGIN
    SELECT pg_catalog.array_agg(t.name) INTO v_tables
      FROM pg_catalog.unnest(pgconsistency._invariant_tables(invariant)) AS t(name)
     WHERE EXISTS (SELECT 1 FROM pgconsistency.audited_table a
                    WHERE pg_catalog.format('%I.%I', a.table_schema, a.table_name) = t.name);
    IF v_tables IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT k.key, c.id, c.operation, c.tbl, c.txid, c.changed_at, c.db_user, c.application_name
          FROM pg_catalog.unnest(keys) AS k(key)
          JOIN LATERAL (
              SELECT l.id, l.operation, pg_catalog.format('%I.%I', l.table_schema, l.table_name) AS tbl, l.txid,
                     l.changed_at, l.db_user, l.application_name
                FROM pgconsistency.audit_log l
               WHERE l.row_key = k.key AND l.changed_at <= until
                 AND pg_catalog.format('%I.%I', l.table_schema, l.table_name) = ANY (v_tables)
               ORDER BY l.changed_at DESC, l.id DESC
               LIMIT 1) c ON true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.audit_causes(text, text[], timestamptz) IS
  'The audited change that caused each key about to become an anomaly of the invariant (the refresh calls it)';
-- The text spliced into the refresh before 0.7.0.
DROP FUNCTION IF EXISTS pgconsistency._anomaly_cause_join(text);

-- As in the framework (sql/framework/10_privileges.sql): nothing in the
-- schema is executable by PUBLIC. A DBA grants audit_history to whoever
-- investigates (docs/audit.md).
REVOKE EXECUTE ON FUNCTION pgconsistency._drop_audit_triggers(regclass), pgconsistency.enable_audit(regclass, text),
       pgconsistency.disable_audit(regclass), pgconsistency.enable_dataset_audit(text),
       pgconsistency.audit_history(text, timestamptz, text), pgconsistency.audit_restore(bigint),
       pgconsistency._invariant_tables(text), pgconsistency.audit_causes(text, text[], timestamptz) FROM PUBLIC;

\o
COMMIT;
