-- pgconsistency framework: the WAL capture (0.7.0). The keys of the rows
-- written to the tables of the invariants in incremental mode, read from the
-- WAL by logical decoding instead of by capture triggers: the writers'
-- transactions carry nothing of pgconsistency's.
--
--   SELECT pgconsistency.set_capture('wal');      -- or 'trigger', the default
--
-- How it works: a logical replication slot of this database (output plugin
-- wal2json, format 2, filtered to the captured tables) keeps the changes;
-- capture_wal(), the first step of every refresh loop (CALL refresh(), the
-- receiver's scheduler and changes loop), reads what was committed since
-- its previous read, evaluates each table's key expressions of
-- define_invariant(keys => ...) over the decoded rows, exactly as the
-- capture triggers do over their transition tables, and writes the keys to
-- captured_key, where the refresh takes them as it takes the triggers'. The slot is moved past what was read only at
-- the next read, once the keys are committed: a crash, a cancel or a killed
-- session between reading and storing loses nothing, the changes are read
-- again.
--
-- Why SQL and wal2json (docs/sql.md, "Incremental refresh"): no publication
-- is made, so the hazard of a published table without a replica identity
-- (PostgreSQL then refuses the application's own UPDATE and DELETE) cannot
-- arise; the read runs wherever the refresh runs (pg_cron or the receiver)
-- and goes through a transaction-pooling proxy; and wal2json is shipped by
-- Debian and by the managed services (RDS, Aurora, Cloud SQL, Azure).

-- _wal_slot_default_name: the slot's name: slot names are the server's, so
-- the database's name is part of it (letters, digits and _ only, as slot
-- names must be).
CREATE OR REPLACE FUNCTION pgconsistency._wal_slot_default_name() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_catalog.left('pgconsistency_' || pg_catalog.regexp_replace(pg_catalog.lower(pg_catalog.current_database()), '[^a-z0-9_]', '_', 'g'), 63)
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_slot_default_name() IS
  'Internal: the name of the WAL capture''s replication slot for this database';

-- _key_reads_row: whether a key expression reads its row r whole (r::text,
-- to_jsonb(r)), not only columns of it (r.<column>).
CREATE OR REPLACE FUNCTION pgconsistency._key_reads_row(key_expression text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN key_expression ~ '(^|[^[:alnum:]_."])r($|[^[:alnum:]_$.])';
END
$fn$;
COMMENT ON FUNCTION pgconsistency._key_reads_row(text) IS
  'Internal: whether a key expression of define_invariant(keys => ...) reads its row whole';

-- _key_columns: the columns of relation that a key expression reads (its
-- references r.<column>); every column when it reads the row whole (r::text).
CREATE OR REPLACE FUNCTION pgconsistency._key_columns(relation regclass, key_expression text) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_whole boolean := pgconsistency._key_reads_row(key_expression);
BEGIN
    RETURN (
        SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped
           AND (v_whole
                OR a.attname IN (
                    SELECT CASE WHEN m[1] LIKE '"%' THEN pg_catalog.replace(pg_catalog.btrim(m[1], '"'), '""', '"')
                                ELSE pg_catalog.lower(m[1]) END
                      FROM pg_catalog.regexp_matches(key_expression, '(?:^|[^[:alnum:]_."])r\.("(?:[^"]|"")+"|[[:alpha:]_][[:alnum:]_$]*)', 'g') AS m)));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._key_columns(regclass, text) IS
  'Internal: the columns of a table that a key expression of define_invariant(keys => ...) reads';

-- _replica_identity_columns: the columns the WAL holds of a row that was
-- deleted (or updated): the replica identity's (default: the primary key's;
-- none without one).
CREATE OR REPLACE FUNCTION pgconsistency._replica_identity_columns(relation regclass) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT coalesce(pg_catalog.array_agg(a.attname::text ORDER BY a.attnum), '{}')
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.oid = relation
           AND (c.relreplident = 'f'
                OR (c.relreplident IN ('d', 'i') AND EXISTS (
                    SELECT 1 FROM pg_catalog.pg_index i
                     WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])
                       AND CASE c.relreplident WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END))));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._replica_identity_columns(regclass) IS
  'Internal: the columns of a table that the WAL holds for its deleted and updated rows (its replica identity)';

-- _replica_identity_fix: the statement that makes the WAL hold the columns
-- of a table: REPLICA IDENTITY USING INDEX on its smallest unique index that
-- can serve (no predicate, no expression, immediate, valid, NOT NULL
-- columns) and holds them; otherwise REPLICA IDENTITY FULL.
CREATE OR REPLACE FUNCTION pgconsistency._replica_identity_fix(relation regclass, columns text[]) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce(
        (SELECT pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I;', relation, ic.relname)
           FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
          WHERE i.indrelid = relation AND i.indisunique AND i.indimmediate AND i.indisvalid
            AND i.indpred IS NULL AND i.indexprs IS NULL
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = relation AND a.attnum = ANY (i.indkey::int2[]) AND NOT a.attnotnull)
            AND columns <@ (SELECT pg_catalog.array_agg(a.attname::text) FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = relation AND a.attnum = ANY (i.indkey::int2[]))
          ORDER BY i.indnatts, ic.relname
          LIMIT 1),
        pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL;', relation))
$fn$;
COMMENT ON FUNCTION pgconsistency._replica_identity_fix(regclass, text[]) IS
  'Internal: the ALTER TABLE ... REPLICA IDENTITY statement that lets the WAL hold the given columns of deleted rows';

-- wal_capture_tables: one row per table the invariants in incremental mode
-- read: the columns their key expressions read, those the WAL holds of a
-- deleted row, and, when those miss some, the statement for the DBA to run.
-- A table with a fix cannot be captured from the WAL: its DELETEs would be
-- lost. (Nothing is published: the application's writes to it work either
-- way.)
CREATE OR REPLACE FUNCTION pgconsistency.wal_capture_tables()
RETURNS TABLE (relation text, key_columns text[], identity_columns text[], fix text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT t.rel::text, t.cols, pgconsistency._replica_identity_columns(t.rel),
           CASE WHEN NOT t.cols <@ pgconsistency._replica_identity_columns(t.rel)
                THEN pgconsistency._replica_identity_fix(t.rel, t.cols) END
      FROM (SELECT pg_catalog.to_regclass(s.relation) AS rel,
                   pg_catalog.array_agg(DISTINCT c.col ORDER BY c.col) AS cols
              FROM pgconsistency.invariant_key_source s
              JOIN pgconsistency.invariant i ON i.name = s.invariant AND i.refresh_mode = 'incremental'
             CROSS JOIN LATERAL pg_catalog.unnest(pgconsistency._key_columns(pg_catalog.to_regclass(s.relation), s.key_expression)) AS c(col)
             WHERE pg_catalog.to_regclass(s.relation) IS NOT NULL
             GROUP BY 1) t
     ORDER BY 1
$fn$;
COMMENT ON FUNCTION pgconsistency.wal_capture_tables() IS
  'Tables the WAL capture reads, their key and replica identity columns, and the statement to run where those miss some';

-- _wal_capture_problem: why this database cannot use the WAL capture, with
-- the fix, or NULL: wal_level, the privilege of the role that owns the slot
-- functions (they read the slot as it: pgconsistency_capture, or the role
-- that installed pgconsistency), the bound on the
-- WAL a slot may keep, the replica identity of the captured tables.
CREATE OR REPLACE FUNCTION pgconsistency._wal_capture_problem(OUT problem text, OUT fix text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_tables text;
    v_fixes  text;
    v_owner  name;
BEGIN
    IF pg_catalog.current_setting('wal_level') <> 'logical' THEN
        problem := pg_catalog.format('the WAL capture needs wal_level = logical; this server has wal_level = %s',
                                     pg_catalog.current_setting('wal_level'));
        fix := 'ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL. Amazon RDS and Aurora: rds.logical_replication = 1 '
               'in the parameter group, then reboot; Cloud SQL: the flag cloudsql.logical_decoding = on; Azure Database for '
               'PostgreSQL: the server parameter wal_level = logical. Or keep the trigger capture.';
        RETURN;
    END IF;
    SELECT p.proowner::regrole::name INTO v_owner FROM pg_catalog.pg_proc p
     WHERE p.oid = 'pgconsistency._wal_slot_changes(text, pg_lsn, integer, text)'::regprocedure;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                    WHERE r.rolname = v_owner
                      AND (r.rolsuper OR r.rolreplication
                           OR (pg_catalog.to_regrole('rds_replication') IS NOT NULL
                               AND pg_catalog.pg_has_role(v_owner, 'rds_replication', 'MEMBER')))) THEN
        problem := pg_catalog.format('the WAL capture reads its replication slot as %I, the owner of pgconsistency''s slot functions, which has neither REPLICATION nor SUPERUSER',
                                     v_owner);
        IF v_owner = 'pgconsistency_capture' THEN
            fix := 'ALTER ROLE pgconsistency_capture REPLICATION; as a superuser (Amazon RDS and Aurora: GRANT rds_replication TO pgconsistency_capture; '
                   'Cloud SQL: as cloudsqlsuperuser; Azure: as azure_pg_admin)';
        ELSE
            fix := pg_catalog.format('Run sql/roles.sql as a superuser: it creates the role pgconsistency_capture (NOLOGIN REPLICATION) and gives it the slot functions, '
                                     'so that no login role needs REPLICATION (Amazon RDS and Aurora: as the master user, then GRANT rds_replication TO pgconsistency_capture). '
                                     'Or: ALTER ROLE %I REPLICATION;', v_owner);
        END IF;
        RETURN;
    END IF;
    IF pg_catalog.current_setting('max_slot_wal_keep_size') = '-1' THEN
        problem := 'the WAL a replication slot may keep is unbounded (max_slot_wal_keep_size = -1): a capture that stopped reading would keep WAL until the disk is full';
        fix := 'ALTER SYSTEM SET max_slot_wal_keep_size = ''10GB''; SELECT pg_reload_conf(); (a few hours of the WAL written at peak, well below the free disk; RDS, Cloud SQL and Azure: the same server parameter)';
        RETURN;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('%s (key columns %s; the WAL holds %s of a deleted row)', t.relation,
                                                   pg_catalog.array_to_string(t.key_columns, ', '),
                                                   coalesce(NULLIF(pg_catalog.array_to_string(t.identity_columns, ', '), ''), 'no column')), '; ' ORDER BY t.relation),
           pg_catalog.string_agg(t.fix, ' ' ORDER BY t.relation)
      INTO v_tables, v_fixes
      FROM pgconsistency.wal_capture_tables() t
     WHERE t.fix IS NOT NULL;
    IF v_tables IS NOT NULL THEN
        problem := 'the WAL does not hold the key columns of the rows deleted from ' || v_tables
                   || ': the WAL capture would miss those deletes';
        fix := v_fixes || ' (or keep the trigger capture)';
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_capture_problem() IS
  'Internal: why the WAL capture cannot be used here, and the fix, or NULLs';

-- The slot functions: the only four that call PostgreSQL's replication slot
-- functions, which need REPLICATION. They run as their owner (SECURITY
-- DEFINER): the role pgconsistency_capture, NOLOGIN REPLICATION, where
-- sql/roles.sql created it (_give_slot_functions_to_capture_role), so that
-- no login role and not even the owner of the pgconsistency schema needs
-- REPLICATION; otherwise the role that installed pgconsistency, which then
-- needs it (_wal_capture_problem says so). Only that owner and the owner of
-- the schema (capture_wal and set_capture run as it) may execute them.

-- _wal_create_slot: create the WAL capture's slot. PostgreSQL allows it only
-- before the transaction wrote anything; it waits for the transactions that
-- write at that moment to end.
CREATE OR REPLACE FUNCTION pgconsistency._wal_create_slot(slot_name text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_error text;
BEGIN
    PERFORM pg_catalog.pg_create_logical_replication_slot(slot_name, 'wal2json');
EXCEPTION
    WHEN undefined_file THEN
        GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
        RAISE EXCEPTION 'pgconsistency: the WAL capture needs the logical decoding output plugin wal2json, which this server lacks (%)', v_error
            USING HINT = 'Install it: apt-get install postgresql-15-wal2json (yum: wal2json_15); Amazon RDS, Aurora, Cloud SQL and Azure have it.';
    WHEN object_not_in_prerequisite_state OR active_sql_transaction THEN
        GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
        RAISE EXCEPTION 'pgconsistency: could not create the replication slot % of the WAL capture: %', slot_name, v_error
            USING HINT = 'Call it in a transaction of its own (a slot can only be created before the transaction writes anything).';
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_create_slot(text) IS
  'Internal: create the WAL capture''s logical replication slot (wal2json)';

-- _wal_drop_slot: drop the WAL capture's slot (invalidated, or the capture
-- back to triggers). Only a wal2json slot of this database, and only while
-- no walsender holds it: the receiver's stream, which ends within seconds
-- when the capture is no longer wal (the next call drops the slot then).
CREATE OR REPLACE FUNCTION pgconsistency._wal_drop_slot(slot_name text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                WHERE s.slot_name = _wal_drop_slot.slot_name AND s.database = pg_catalog.current_database()
                  AND s.plugin = 'wal2json' AND s.active_pid IS NULL) THEN
        PERFORM pg_catalog.pg_drop_replication_slot(slot_name);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_drop_slot(text) IS
  'Internal: drop the WAL capture''s replication slot (a wal2json slot of this database only)';

-- _wal_advance_slot: move the WAL capture's slot to a position whose keys
-- are stored (committed by the previous read).
CREATE OR REPLACE FUNCTION pgconsistency._wal_advance_slot(slot_name text, upto pg_lsn) RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT FROM pg_catalog.pg_replication_slot_advance(slot_name, upto)
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_advance_slot(text, pg_lsn) IS
  'Internal: move the WAL capture''s replication slot past changes whose keys are stored';

-- _wal_slot_changes: the changes the WAL capture's slot holds, committed
-- before upto, whole transactions up to max_changes, without consuming them
-- (peek): wal2json format 2, one row per change, only the tables given (its
-- add-tables syntax, _wal_add_tables).
CREATE OR REPLACE FUNCTION pgconsistency._wal_slot_changes(slot_name text, upto pg_lsn, max_changes integer, tables text)
RETURNS TABLE (lsn pg_lsn, data text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT w.lsn, w.data
      FROM pg_catalog.pg_logical_slot_peek_changes(slot_name, upto, max_changes, 'format-version', '2', 'add-tables', tables,
                                                   'include-types', 'false') AS w
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_slot_changes(text, pg_lsn, integer, text) IS
  'Internal: the changes the WAL capture''s replication slot holds for the captured tables, not consumed';

-- _give_slot_functions_to_capture_role: where the role pgconsistency_capture
-- exists and the current role may give it objects, make it the owner of the
-- four slot functions, and let the owner of the pgconsistency schema (whose
-- capture_wal and set_capture call them) execute them. install.sql (each
-- run) and sql/roles.sql call it. Returns whether the capture role owns them.
CREATE OR REPLACE FUNCTION pgconsistency._give_slot_functions_to_capture_role() RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    f       regprocedure;
    v_owner name;
BEGIN
    IF pg_catalog.to_regrole('pgconsistency_capture') IS NULL THEN
        RETURN false;
    END IF;
    SELECT n.nspowner::regrole::name INTO v_owner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgconsistency';
    FOREACH f IN ARRAY ARRAY['pgconsistency._wal_create_slot(text)', 'pgconsistency._wal_drop_slot(text)',
                             'pgconsistency._wal_advance_slot(text, pg_lsn)',
                             'pgconsistency._wal_slot_changes(text, pg_lsn, integer, text)']::regprocedure[] LOOP
        IF (SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid = f) <> 'pgconsistency_capture'::regrole THEN
            IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
               AND NOT pg_catalog.pg_has_role(current_user, 'pgconsistency_capture', 'MEMBER') THEN
                RETURN false; -- roles.sql, run by a superuser, does it
            END IF;
            EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO pgconsistency_capture', f);
        END IF;
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, v_owner);
    END LOOP;
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._give_slot_functions_to_capture_role() IS
  'Internal: make pgconsistency_capture (NOLOGIN REPLICATION) the owner of the four slot functions, where it exists';

-- _wal_add_tables: the tables to decode, as wal2json's add-tables option
-- (schema.table, with , . \ * and space escaped): every table an invariant
-- in incremental mode reads. NULL: none.
CREATE OR REPLACE FUNCTION pgconsistency._wal_add_tables() RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT pg_catalog.string_agg(DISTINCT pg_catalog.regexp_replace(n.nspname, '([,.\\* ])', '\\\1', 'g') || '.'
                                              || pg_catalog.regexp_replace(c.relname, '([,.\\* ])', '\\\1', 'g'), ',')
          FROM pgconsistency.capture_source s
          JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(s.relation)
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_add_tables() IS
  'Internal: the tables the WAL capture decodes, in wal2json''s add-tables syntax';

-- _wal_column_place: the place of a column in a row that wal2json wrote
-- whole (0 first): the columns of the table before it, dropped ones left
-- out.
CREATE OR REPLACE FUNCTION pgconsistency._wal_column_place(relation regclass, col text) RETURNS integer
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (SELECT pg_catalog.count(*)::integer
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attnum < (SELECT c.attnum FROM pg_catalog.pg_attribute c WHERE c.attrelid = relation AND c.attname = col));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_column_place(regclass, text) IS
  'Internal: the place of a column in a row the WAL capture decoded, when the row has every column';

-- _wal_column_value: the expression of column col's value (jsonb) in the
-- row a change the WAL capture decoded holds (row_list, the SQL expression
-- of wal2json's [{"name": ..., "value": ...}, ...] of a row of relation:
-- tuple.columns of _wal_read_statement); NULL where the row lacks it.
-- wal2json writes a new row, and an old one under REPLICA IDENTITY FULL,
-- with every column of the table in the table's order, dropped ones left
-- out: the element at the column's place in that list is read directly
-- when it has the column's name. Elsewhere (an old row with only its
-- replica identity's columns, a change written before the table's columns
-- changed) the elements are searched by name, with a JSON path. A read of
-- 94,858 changes at 1M datasets: 1.20 s searching every key column by
-- name, 1.08 s by place (BENCHMARKS.md, 0.7.4).
CREATE OR REPLACE FUNCTION pgconsistency._wal_column_value(relation regclass, col text, row_list text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_place integer := pgconsistency._wal_column_place(relation, col);
BEGIN
    RETURN pg_catalog.format('CASE WHEN %1$s -> %2$s ->> ''name'' = %3$L THEN %1$s -> %2$s -> ''value'''
                             ' ELSE pg_catalog.jsonb_path_query_first(%1$s, ''$[*] ? (@.name == $n).value'', %4$L::jsonb) END',
                             row_list, v_place, col, pg_catalog.jsonb_build_object('n', col));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_column_value(regclass, text, text) IS
  'Internal: the SQL expression of a column''s value in a row the WAL capture decoded';

-- _wal_unchanged: the SQL expression, over a change the WAL capture decoded
-- (change.c, wal2json's change), of whether an UPDATE left the columns
-- cols of relation as they were: each is in the new row and in the old one
-- (identity) with the same value, compared as JSON text (1.0 and 1.00
-- differ). wal2json writes as the old row of every UPDATE the whole old row
-- under REPLICA IDENTITY FULL, otherwise the replica identity's columns,
-- from the old row where they changed, else from the new one (PostgreSQL
-- logs the old key only then): both are what the columns were. A column
-- missing from either row (not in the replica identity, or an unchanged
-- TOAST value left out of the new row) counts as changed.
CREATE OR REPLACE FUNCTION pgconsistency._wal_unchanged(relation regclass, cols text[]) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN coalesce((
        SELECT pg_catalog.string_agg(pg_catalog.format('(%s)::text = (%s)::text',
                                         pgconsistency._wal_column_value(relation, x.col, 'change.c -> ''columns'''),
                                         pgconsistency._wal_column_value(relation, x.col, 'change.c -> ''identity''')),
                                     ' AND ' ORDER BY x.col)
          FROM pg_catalog.unnest(cols) AS x(col)), 'true');
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_unchanged(regclass, text[]) IS
  'Internal: the SQL expression of whether an UPDATE the WAL capture decoded left some columns as they were';

-- _wal_key_expression: the SQL expression of one capture source's key over
-- a decoded row (the CTE tuple of _wal_read_statement: tuple.columns,
-- wal2json's [{"name": ..., "value": ...}, ...] of a new or an old row of
-- the source's table), NULL when the row gives none. The row is cut to the
-- columns the key expression reads, each taken by its place or its name
-- (_wal_column_value; a block's payload is never converted), then made a
-- row of the table by jsonb_populate_record, so that the expression of
-- define_invariant(keys => ...) is evaluated as the capture triggers
-- evaluate it: no second mapping to keep in step. An expression that is a
-- text or varchar column alone (r.dataset_id::text, the common case) is
-- that column's JSON string: no row is made (the same text, without a
-- record per change). A row that holds none of those columns (an old row
-- whose replica identity lacks them) gives no key. An expression that
-- reads the row whole gets every column. The read statement takes each
-- row's key with one CASE over its source (until 0.7.6, a SELECT per
-- source scanned every decoded row: a read of 38,277 changes took 838 ms
-- against 750, BENCHMARKS.md).
CREATE OR REPLACE FUNCTION pgconsistency._wal_key_expression(relation regclass, key_expression text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT CASE
                 WHEN pg_catalog.cardinality(k.cols) = (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
                                                         WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped) THEN
                     pg_catalog.format(
                         '(SELECT (%s)::text'
                         ' FROM (SELECT pg_catalog.jsonb_object_agg(x ->> ''name'', x -> ''value'') AS o'
                         ' FROM pg_catalog.jsonb_array_elements(tuple.columns) AS x) AS p'
                         ' CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%s, p.o) AS r'
                         ' WHERE p.o IS NOT NULL)',
                         key_expression, relation)
                 WHEN pg_catalog.cardinality(k.cols) = 1
                      AND key_expression ~ '^\s*r\.[a-z_][a-z0-9_$]*\s*(::\s*(pg_catalog\.)?text\s*)?$'
                      AND (SELECT a.atttypid FROM pg_catalog.pg_attribute a WHERE a.attrelid = relation AND a.attname = k.cols[1])
                          IN ('pg_catalog.text'::regtype, 'pg_catalog.varchar'::regtype) THEN
                     pg_catalog.format('(%s #>> ''{}'')', pgconsistency._wal_column_value(relation, k.cols[1], 'tuple.columns'))
                 ELSE
                     pg_catalog.format(
                         '(SELECT (%s)::text FROM (SELECT %s OFFSET 0) AS p'
                         ' CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%s, pg_catalog.jsonb_build_object(%s)) AS r'
                         ' WHERE %s)',
                         key_expression,
                         (SELECT pg_catalog.string_agg(pg_catalog.format('%s AS c%s', pgconsistency._wal_column_value(relation, col, 'tuple.columns'), i), ', ' ORDER BY i)
                            FROM pg_catalog.unnest(k.cols) WITH ORDINALITY AS u(col, i)),
                         relation,
                         (SELECT pg_catalog.string_agg(pg_catalog.format('%L, p.c%s', col, i), ', ' ORDER BY i)
                            FROM pg_catalog.unnest(k.cols) WITH ORDINALITY AS u(col, i)),
                         (SELECT pg_catalog.string_agg(pg_catalog.format('p.c%s IS NOT NULL', i), ' OR ' ORDER BY i)
                            FROM pg_catalog.generate_series(1, pg_catalog.cardinality(k.cols)) AS i))
               END
          FROM (SELECT pgconsistency._key_columns(relation, key_expression) AS cols) AS k
         WHERE pg_catalog.cardinality(k.cols) > 0);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_key_expression(regclass, text) IS
  'Internal: the SQL expression of a capture source''s key over a row the WAL capture decoded';

-- _wal_read_statement: the statement that reads the slot once: $1 the slot,
-- $2 up to which WAL position, $3 how many changes at most (whole
-- transactions), $4 the tables (wal2json's add-tables); or, when $5 (text[])
-- is not NULL, the changes it holds, which the receiver's replication
-- connection received from the slot (capture_wal_stream). Each change is
-- parsed once; its table is matched with the capture sources once (a hash
-- join with their list, one row per set of columns their invariants read,
-- not a scan of every change per source); an UPDATE is kept for the sets
-- whose values it changed (_wal_unchanged), anything else once per source;
-- it writes each row's key (one CASE over the sources' expressions,
-- _wal_key_expression) to captured_key, with the columns that changed, a
-- TRUNCATE to capture_gap, and returns the changes read, the position
-- after the last transaction read, and the keys written. NULL: no source's
-- table exists. capture_wal keeps it between reads (capture.read_statement).
CREATE OR REPLACE FUNCTION pgconsistency._wal_read_statement() RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT pg_catalog.replace(pg_catalog.replace(pg_catalog.replace($q$
            WITH change AS MATERIALIZED (
                SELECT w.lsn, j.c, j.c ->> 'action' AS action
                  FROM (SELECT s.lsn, s.data FROM pgconsistency._wal_slot_changes($1, $2, $3, $4) AS s WHERE $5::text[] IS NULL
                        UNION ALL
                        SELECT NULL::pg_lsn, d.data FROM pg_catalog.unnest($5::text[]) AS d(data)) AS w
                 CROSS JOIN LATERAL (SELECT w.data::jsonb AS c OFFSET 0) AS j),
            tuple AS (
                SELECT s.source, v.columns, CASE WHEN u.compared THEN s.read_columns END AS read_columns
                  FROM change
                  JOIN (VALUES /*sources*/) AS s(source, schema_name, table_name, read_columns, first, columns_set)
                    ON s.schema_name = change.c ->> 'schema' AND s.table_name = change.c ->> 'table'
                 CROSS JOIN LATERAL (SELECT change.action = 'U' AND s.read_columns IS NOT NULL AND change.c ? 'identity' AS compared) AS u
                 CROSS JOIN LATERAL (VALUES (change.c -> 'columns'), (change.c -> 'identity')) AS v(columns)
                 WHERE change.action IN ('I', 'U', 'D') AND v.columns IS NOT NULL
                   AND CASE WHEN u.compared THEN NOT coalesce(CASE s.columns_set /*unchanged*/ END, false) ELSE s.first END),
            keys AS (
                INSERT INTO pgconsistency.captured_key (source, key, read_columns)
                SELECT DISTINCT k.source, k.key COLLATE "C", k.read_columns
                  FROM (SELECT tuple.source, CASE tuple.source /*keys*/ END AS key, tuple.read_columns FROM tuple) AS k
                 WHERE k.key IS NOT NULL
                RETURNING 1),
            gaps AS (
                INSERT INTO pgconsistency.capture_gap (relation, reason, at)
                SELECT DISTINCT t.rel::text, 'TRUNCATE ' || t.rel::text, pg_catalog.clock_timestamp()
                  FROM change
                 CROSS JOIN LATERAL (SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(change.c ->> 'schema') || '.'
                                                                   || pg_catalog.quote_ident(change.c ->> 'table')) AS rel) AS t
                 WHERE change.action = 'T' AND t.rel IS NOT NULL
                RETURNING 1)
            SELECT r.changes, r.last, (SELECT pg_catalog.count(*) FROM keys) + (SELECT pg_catalog.count(*) FROM gaps)
              FROM (SELECT pg_catalog.count(*) AS changes, pg_catalog.max(change.lsn) FILTER (WHERE change.action = 'C') AS last
                      FROM change) AS r
        $q$, '/*keys*/', k.keys), '/*sources*/', w.sources), '/*unchanged*/', w.unchanged)
          FROM (SELECT pg_catalog.string_agg(pg_catalog.format('WHEN %s THEN %s', e.id, e.expression), ' ' ORDER BY e.id) AS keys
                  FROM (SELECT s.id, pgconsistency._wal_key_expression(s.rel, s.key_expression) AS expression
                          FROM (SELECT s.id, s.key_expression, pg_catalog.to_regclass(s.relation) AS rel
                                  FROM pgconsistency.capture_source s) AS s
                         WHERE s.rel IS NOT NULL) AS e
                 WHERE e.expression IS NOT NULL) AS k,
               -- One row of sources for each read_columns of a source's
               -- invariants (columns_set, numbered from 1; first: the
               -- source's first), or one with read_columns NULL when one
               -- of them reads every column; unchanged: for each, whether
               -- an UPDATE left those columns as they were.
               (SELECT pg_catalog.string_agg(pg_catalog.format('(%s, %L, %L, %L::text[], %s, %s)', x.id, x.nspname, x.relname,
                                                               x.read_columns, x.first::text, x.columns_set), ', ' ORDER BY x.columns_set) AS sources,
                       coalesce(pg_catalog.string_agg(pg_catalog.format('WHEN %s THEN %s', x.columns_set,
                                                                        pgconsistency._wal_unchanged(x.rel, x.read_columns)), ' ' ORDER BY x.columns_set)
                                    FILTER (WHERE x.read_columns IS NOT NULL), 'WHEN 0 THEN false') AS unchanged
                  FROM (SELECT c.id, c.rel, n.nspname, r.relname, c.read_columns,
                               pg_catalog.row_number() OVER (PARTITION BY c.id ORDER BY c.read_columns) = 1 AS first,
                               pg_catalog.row_number() OVER (ORDER BY c.id, c.read_columns) AS columns_set
                          FROM (SELECT DISTINCT s.id, pg_catalog.to_regclass(s.relation) AS rel,
                                       CASE WHEN pg_catalog.bool_or(k.read_columns IS NULL) OVER (PARTITION BY s.id) THEN NULL
                                            ELSE k.read_columns END AS read_columns
                                  FROM pgconsistency.capture_source s
                                  LEFT JOIN (pgconsistency.invariant_key_source k
                                             JOIN pgconsistency.invariant i ON i.name = k.invariant AND i.refresh_mode = 'incremental')
                                    ON k.relation = s.relation AND k.key_expression = s.key_expression) AS c
                          JOIN pg_catalog.pg_class r ON r.oid = c.rel
                          JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace) AS x) AS w
         WHERE k.keys IS NOT NULL);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_read_statement() IS
  'Internal: the statement that reads the WAL capture''s slot once, with every capture source''s key SELECT';

-- _wal_statement: the read statement to run (_wal_read_statement): kept,
-- the one of the previous read (capture.read_statement), unless
-- _install_capture emptied it since (every run of install.sql, every change
-- of the sources), or a table of a capture source is not the one it was
-- built for (dropped, or created again: their oids head it); built again
-- otherwise. Columns it finds by name where their place moved. NULL: no
-- capture source.
CREATE OR REPLACE FUNCTION pgconsistency._wal_statement(kept text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_relations text;
BEGIN
    SELECT '/* relations: ' || pg_catalog.string_agg(coalesce(pg_catalog.to_regclass(s.relation)::oid::text, '-'), ' ' ORDER BY s.id) || ' */'
      INTO v_relations
      FROM pgconsistency.capture_source s;
    RETURN CASE WHEN pg_catalog.starts_with(kept, v_relations) THEN kept
                ELSE v_relations || pgconsistency._wal_read_statement() END;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_statement(text) IS
  'Internal: the read statement of the WAL capture to run: the one kept, unless its tables changed';

-- _wal_slot_check: what is wrong with the WAL capture's slot: kind
-- 'missing' (dropped, or this server was promoted: PostgreSQL 15 slots do
-- not follow a failover), 'lost' (invalidated: it fell more than
-- max_slot_wal_keep_size behind) or 'foreign' (another database's or
-- plugin's slot of that name), and the problem in words; NULLs when none.
CREATE OR REPLACE FUNCTION pgconsistency._wal_slot_check(slot_name text, OUT kind text, OUT problem text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT CASE
             WHEN s.slot_name IS NULL THEN 'missing'
             WHEN s.wal_status = 'lost' THEN 'lost'
             WHEN s.database IS DISTINCT FROM pg_catalog.current_database() OR s.plugin IS DISTINCT FROM 'wal2json' THEN 'foreign'
           END,
           CASE
             WHEN s.slot_name IS NULL THEN
                 pg_catalog.format('the WAL capture''s slot %s was missing (dropped, or this server was promoted from a standby: slots do not follow a failover)', _wal_slot_check.slot_name)
             WHEN s.wal_status = 'lost' THEN
                 pg_catalog.format('the WAL capture''s slot %s was invalidated: it fell more than max_slot_wal_keep_size (%s) behind, and the WAL it needed is gone',
                                   _wal_slot_check.slot_name, pg_catalog.current_setting('max_slot_wal_keep_size'))
             WHEN s.database IS DISTINCT FROM pg_catalog.current_database() OR s.plugin IS DISTINCT FROM 'wal2json' THEN
                 pg_catalog.format('the replication slot %s is not the WAL capture''s of this database (database %s, plugin %s)',
                                   _wal_slot_check.slot_name, coalesce(s.database::text, 'none'), coalesce(s.plugin::text, 'none'))
           END
      INTO kind, problem
      FROM (SELECT 1) AS one
      LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = _wal_slot_check.slot_name;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_slot_check(text) IS
  'Internal: what is wrong with the WAL capture''s slot (missing, lost, foreign) and why, or NULLs';

-- _wal_slot_problem: _wal_slot_check's problem alone.
CREATE OR REPLACE FUNCTION pgconsistency._wal_slot_problem(slot_name text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (pgconsistency._wal_slot_check(slot_name)).problem;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_slot_problem(text) IS
  'Internal: why the WAL capture''s slot cannot be read (missing, invalidated, not ours), or NULL';

-- capture_wal: read the WAL capture's slot once, the first step of every
-- refresh loop (CALL refresh(), the receiver's scheduler and its changes
-- loop call it, each in a transaction of its own). Returns the changes read
-- (whole transactions, at most max_changes past the first), or NULL when the
-- capture is not 'wal', this is a standby, or another session is reading:
-- another refresh loop, or the receiver's replication connection, which
-- holds the slot while it streams (capture_wal_stream).
-- Before reading, the slot is moved to where the previous read ended, whose
-- keys are committed; the keys of this read are committed with this
-- transaction and the slot moves past them at the next read. A slot that is
-- missing or invalidated is created again, and every invariant in
-- incremental mode reconciles (a full refresh, started after the new slot
-- exists, heals what was missed and reports it).
CREATE OR REPLACE FUNCTION pgconsistency.capture_wal(max_changes integer DEFAULT 100000) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    cfg        pgconsistency.capture%ROWTYPE;
    v_kind     text;
    v_problem  text;
    v_upto     pg_lsn;
    v_confirmed pg_lsn;
    v_active   integer;
    v_tables   text;
    v_statement text;
    v_changes  bigint := 0;
    v_last     pg_lsn;
    v_written  bigint;
BEGIN
    SELECT * INTO cfg FROM pgconsistency.capture;
    IF cfg.method IS DISTINCT FROM 'wal' OR pg_catalog.pg_is_in_recovery() THEN
        -- A slot a stream held when set_capture('trigger') ran, left since
        -- (the stream stopped for good): nothing reads it, and it keeps WAL.
        IF cfg.method = 'trigger' AND cfg.slot_name IS NOT NULL AND NOT pg_catalog.pg_is_in_recovery() THEN
            PERFORM pgconsistency._wal_drop_slot(cfg.slot_name);
        END IF;
        RETURN NULL;
    END IF;
    -- One reader at a time (the slot serves one session at a time); another
    -- one skips, the changes wait in the slot.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.capture'), 1) THEN
        RETURN NULL;
    END IF;
    SELECT c.kind, c.problem INTO v_kind, v_problem FROM pgconsistency._wal_slot_check(cfg.slot_name) AS c;
    IF v_kind = 'foreign' THEN
        RAISE EXCEPTION 'pgconsistency: %', v_problem
            USING HINT = 'Drop that slot if nothing uses it, or give the capture another: UPDATE pgconsistency.capture SET slot_name = ''...''; then SELECT pgconsistency.set_capture(''wal'').';
    ELSIF v_problem IS NOT NULL THEN
        -- Dropped, invalidated or missing after a failover: create it again
        -- (first: nothing may be written before), then reconcile everything.
        PERFORM pgconsistency._wal_drop_slot(cfg.slot_name); -- invalidated
        PERFORM pgconsistency._wal_create_slot(cfg.slot_name);
        UPDATE pgconsistency.capture
           SET wal_position = NULL, slot_created_at = pg_catalog.clock_timestamp(), slot_lost_reason = v_problem,
               slot_lost_at = pg_catalog.clock_timestamp(), read_at = pg_catalog.clock_timestamp(), read_changes = 0;
        UPDATE pgconsistency.capture_state c SET reconcile_reason = coalesce(c.reconcile_reason, v_problem);
        RAISE WARNING 'pgconsistency: %; it was created again, and the next refresh of every invariant in incremental mode is a full one (a reconcile)', v_problem;
        RETURN 0;
    END IF;

    -- Everything committed before v_upto is read now, or, past max_changes,
    -- up to the end of the last transaction read.
    v_upto := pg_catalog.pg_current_wal_flush_lsn();
    SELECT s.confirmed_flush_lsn, s.active_pid INTO v_confirmed, v_active
      FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = cfg.slot_name;
    IF v_active IS NOT NULL AND v_active <> pg_catalog.pg_backend_pid() THEN
        RETURN NULL; -- the receiver's replication connection streams it
    END IF;
    v_tables := pgconsistency._wal_add_tables();
    v_statement := pgconsistency._wal_statement(cfg.read_statement);
    BEGIN
        IF cfg.wal_position > v_confirmed THEN
            PERFORM pgconsistency._wal_advance_slot(cfg.slot_name, cfg.wal_position);
        END IF;
        IF v_tables IS NOT NULL AND v_statement IS NOT NULL THEN
            EXECUTE v_statement INTO v_changes, v_last, v_written
              USING cfg.slot_name, v_upto, max_changes, v_tables, NULL::text[];
        END IF;
    EXCEPTION
        WHEN object_in_use THEN
            RETURN NULL; -- a replication connection took the slot meanwhile
    END;
    UPDATE pgconsistency.capture
       SET wal_position = CASE WHEN v_changes >= max_changes THEN coalesce(v_last, cfg.wal_position) ELSE v_upto END,
           read_at = pg_catalog.clock_timestamp(), read_changes = v_changes, read_statement = v_statement, read_by = 'sql';
    RETURN v_changes;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.capture_wal(integer) IS
  'Read the keys of the changed rows from the WAL capture''s slot (first step of every refresh loop)';

-- set_capture: how the writes of the tables of the invariants in incremental
-- mode are captured, for the whole database: 'trigger' (the default; in the
-- writers' transactions) or 'wal' (logical decoding; nothing in the writers'
-- transactions). 'wal' is refused, with the fix, when this server or a table
-- cannot serve it (_wal_capture_problem). Call it in a transaction of its
-- own: a replication slot can only be created before the transaction writes.
-- Every invariant in incremental mode reconciles at its next refresh. Returns
-- the capture before.
--   SELECT pgconsistency.set_capture('wal');
CREATE OR REPLACE FUNCTION pgconsistency.set_capture(method text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    cfg       pgconsistency.capture%ROWTYPE;
    v_check   record;
    v_kind    text;
    v_problem text;
    v_reason  text := 'the capture changed to ' || method;
BEGIN
    IF method IS NULL OR method NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'pgconsistency: the capture must be ''trigger'' or ''wal'', got %', coalesce(pg_catalog.quote_literal(method), 'NULL');
    END IF;
    SELECT * INTO cfg FROM pgconsistency.capture;
    cfg.slot_name := coalesce(cfg.slot_name, pgconsistency._wal_slot_default_name());
    IF method = 'wal' THEN
        v_check := pgconsistency._wal_capture_problem();
        IF v_check.problem IS NOT NULL THEN
            RAISE EXCEPTION 'pgconsistency: %', v_check.problem USING HINT = v_check.fix;
        END IF;
        SELECT c.kind, c.problem INTO v_kind, v_problem FROM pgconsistency._wal_slot_check(cfg.slot_name) AS c;
        IF v_kind = 'foreign' THEN
            RAISE EXCEPTION 'pgconsistency: %', v_problem
                USING HINT = 'Drop that slot if nothing uses it, or give the capture another: UPDATE pgconsistency.capture SET slot_name = ''...''.';
        END IF;
        IF v_problem IS NOT NULL THEN
            PERFORM pgconsistency._wal_drop_slot(cfg.slot_name); -- invalidated
            PERFORM pgconsistency._wal_create_slot(cfg.slot_name); -- before anything is written
            cfg.slot_created_at := pg_catalog.clock_timestamp();
            cfg.wal_position := NULL;
        END IF;
    END IF;
    IF cfg.method IS DISTINCT FROM method OR v_problem IS NOT NULL THEN
        UPDATE pgconsistency.capture
           SET method = set_capture.method, slot_name = cfg.slot_name, slot_created_at = cfg.slot_created_at,
               wal_position = cfg.wal_position;
        -- What was written while the capture changed hands (or while the
        -- slot was gone): reconcile.
        UPDATE pgconsistency.capture_state c
           SET reconcile_reason = coalesce(c.reconcile_reason, coalesce(v_problem, v_reason));
    END IF;
    -- The triggers follow (dropped for 'wal', created for 'trigger').
    PERFORM pgconsistency._install_capture();
    IF method = 'trigger' THEN
        -- After the triggers exist: nothing is left uncaptured in between.
        -- A slot the receiver's replication connection holds cannot be
        -- dropped: the stream ends at its next store (capture_wal_stream
        -- returns NULL); the next refresh loop (capture_wal) or the next
        -- start of a stream (wal_stream_start) drops the slot then.
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
                    WHERE s.slot_name = cfg.slot_name AND s.active_pid IS NOT NULL AND s.active_pid <> pg_catalog.pg_backend_pid()) THEN
            RAISE NOTICE 'pgconsistency: the WAL capture''s slot % is read by a replication connection (the receiver''s refresh::wal_stream); it is dropped when that stream ends, within seconds', cfg.slot_name;
        ELSE
            PERFORM pgconsistency._wal_drop_slot(cfg.slot_name);
        END IF;
    END IF;
    RETURN cfg.method;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.set_capture(text) IS
  'Capture the writes for incremental refresh by triggers (''trigger'', the default) or from the WAL (''wal''); returns the capture before';

-- The receiver's stream (refresh::wal_stream, 0.7.7). The SQL reads above
-- decode, at every read, the WAL from the slot's restart_lsn, which
-- PostgreSQL moves only about every 15 seconds (at a running-transactions
-- record): a read under load decodes again what the previous reads did. A
-- replication connection (START_REPLICATION, a role with REPLICATION,
-- straight to the server) decodes each record once, as it is written. The
-- receiver receives wal2json's changes there and hands them, up to a
-- second's worth at a time, to capture_wal_stream on its ordinary
-- connection, which evaluates the keys exactly as capture_wal does (the same
-- statement) and stores them; only once that transaction committed does the
-- receiver confirm the position they reach to the slot. While the stream
-- holds the slot, capture_wal leaves it alone; when the stream stops,
-- capture_wal reads from the confirmed position again.

-- wal_stream_start: where the receiver's replication connection starts
-- streaming the WAL capture's slot: its name, the position whose keys are
-- stored (the slot's confirmed position, or further where a read by SQL
-- stored more and has not moved the slot yet), the tables to decode (wal2json's
-- add-tables), or, in problem, why it cannot now: the capture is not
-- 'wal' (a slot the stream left after set_capture('trigger') is dropped
-- here), this is a standby, nothing is captured, the slot is missing or
-- invalidated (the refresh loop's capture_wal creates it again and
-- reconciles).
CREATE OR REPLACE FUNCTION pgconsistency.wal_stream_start(OUT slot_name text, OUT start_position pg_lsn, OUT tables text,
                                                          OUT problem text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    cfg pgconsistency.capture%ROWTYPE;
BEGIN
    SELECT * INTO cfg FROM pgconsistency.capture;
    slot_name := cfg.slot_name;
    IF cfg.method IS DISTINCT FROM 'wal' THEN
        problem := pg_catalog.format('the capture is %s, not wal (SELECT pgconsistency.set_capture(''wal''); to read the WAL)', coalesce(cfg.method, 'not installed'));
        IF cfg.slot_name IS NOT NULL THEN
            PERFORM pgconsistency._wal_drop_slot(cfg.slot_name); -- one a stream left
        END IF;
        RETURN;
    END IF;
    IF pg_catalog.pg_is_in_recovery() THEN
        problem := 'this server is a standby: the WAL capture reads the primary';
        RETURN;
    END IF;
    tables := pgconsistency._wal_add_tables();
    IF tables IS NULL THEN
        problem := 'no invariant in incremental mode reads a table that exists';
        RETURN;
    END IF;
    problem := pgconsistency._wal_slot_problem(cfg.slot_name);
    IF problem IS NOT NULL THEN
        problem := problem || '; the refresh loop creates it again (capture_wal)';
        RETURN;
    END IF;
    SELECT GREATEST(cfg.wal_position, s.confirmed_flush_lsn) INTO start_position
      FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = cfg.slot_name;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.wal_stream_start() IS
  'Where the receiver''s replication connection starts streaming the WAL capture''s slot, or why it cannot';

-- capture_wal_stream: store the keys of changes the receiver's replication
-- connection received from the WAL capture's slot (wal2json format 2, one
-- change per element, in the order received). Returns the changes given;
-- NULL when the capture is not 'wal' any more (the stream stops); -1,
-- storing nothing, when tables (what the stream decodes) is not what the
-- capture decodes now (the stream starts again with the new tables from
-- what it confirmed, lest it miss a table's changes). The position is not
-- the caller's to say: the stream confirms it to the slot itself, after
-- this transaction commits, and a stream or a read by SQL goes on from
-- there. So a caller can only add keys (re-checks), never make a read skip
-- changes. Keys stored twice (a stream started again before it confirmed)
-- cost a re-check, nothing else.
CREATE OR REPLACE FUNCTION pgconsistency.capture_wal_stream(changes text[], tables text) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    cfg         pgconsistency.capture%ROWTYPE;
    v_statement text;
    v_changes   bigint := 0;
    v_last      pg_lsn;
    v_written   bigint;
BEGIN
    SELECT * INTO cfg FROM pgconsistency.capture;
    IF cfg.method IS DISTINCT FROM 'wal' THEN
        RETURN NULL;
    END IF;
    IF tables IS DISTINCT FROM pgconsistency._wal_add_tables() THEN
        RETURN -1;
    END IF;
    v_statement := pgconsistency._wal_statement(cfg.read_statement);
    IF v_statement IS NOT NULL AND pg_catalog.cardinality(changes) > 0 THEN
        EXECUTE v_statement INTO v_changes, v_last, v_written
          USING cfg.slot_name, NULL::pg_lsn, NULL::integer, tables, changes;
    END IF;
    UPDATE pgconsistency.capture
       SET read_at = pg_catalog.clock_timestamp(), read_changes = v_changes, read_statement = v_statement, read_by = 'stream';
    RETURN v_changes;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.capture_wal_stream(text[], text) IS
  'Store the keys of changes the receiver''s replication connection received from the WAL capture''s slot';
