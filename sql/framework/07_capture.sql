-- pgconsistency framework: incremental refresh. The capture triggers on the
-- tables the invariants in incremental mode read record the keys of the rows
-- each statement changed; a refresh re-checks those keys only, and falls
-- back to a full refresh (a reconcile) whenever the capture may have missed
-- a write. set_refresh_mode() switches an invariant between the two modes.

-- The reasons for a reconcile that expects differences: the capture did not
-- cover the snapshot yet, or the query changed.
CREATE OR REPLACE FUNCTION pgconsistency._reconcile_reason_started() RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$ SELECT 'incremental mode just started'::text $fn$;
COMMENT ON FUNCTION pgconsistency._reconcile_reason_started() IS
  'Internal: the reconcile reason of an invariant just switched to incremental mode (a reconcile that heals nothing)';
CREATE OR REPLACE FUNCTION pgconsistency._reconcile_reason_changed() RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$ SELECT 'its query or key mapping changed'::text $fn$;
COMMENT ON FUNCTION pgconsistency._reconcile_reason_changed() IS
  'Internal: the reconcile reason of an invariant whose query or key mapping changed (a reconcile that heals nothing)';

-- _check_incremental: raise unless the invariant can be refreshed
-- incrementally: it was made by define_invariant, and every relation its
-- query reads is a table with a key mapping (define_invariant(keys => ...)).
CREATE OR REPLACE FUNCTION pgconsistency._check_incremental(invariant text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_query    text;
    v_rels     text[];
    v_unmapped text[];
    v_nottable text[];
BEGIN
    SELECT i.query, i.relations INTO v_query, v_rels FROM pgconsistency.invariant i WHERE i.name = _check_incremental.invariant;
    IF v_query IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: invariant % cannot be refreshed incrementally: it is a materialized view of register_invariant()', invariant
            USING HINT = 'Define it with pgconsistency.define_invariant(name, query, keys => ...) instead.';
    END IF;
    SELECT pg_catalog.array_agg(r ORDER BY r) FILTER (WHERE c.relkind NOT IN ('r', 'p')),
           pg_catalog.array_agg(r ORDER BY r) FILTER (WHERE c.relkind IN ('r', 'p') AND NOT EXISTS (
               SELECT 1 FROM pgconsistency.invariant_key_source s
                WHERE s.invariant = _check_incremental.invariant AND s.relation = r))
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
COMMENT ON FUNCTION pgconsistency._check_incremental(text) IS
  'Internal: raise unless an invariant''s query and key mapping allow incremental refresh';

-- _generated_capture_function: the text of the capture function of table rel,
-- for its capture sources ids (their key expressions exprs): the keys of
-- the inserted rows, of the deleted rows, and of an UPDATE those of the
-- rows whose columns read changed (each source's sets of columns read, or
-- every updated row's where an invariant reads rows whole), or TRUNCATE
-- recorded as a gap. _install_capture replaces the function when this text
-- differs from its own.
CREATE OR REPLACE FUNCTION pgconsistency._generated_capture_function(rel regclass, ids integer[], exprs text[]) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_rows     text;
    v_upd      text;
    v_compared text;
BEGIN
    -- rows: the changed rows as r (a transition table), keyed by source.
    -- The keys of an UPDATE: those of the rows whose values
    -- of the columns an invariant reads changed, old and new,
    -- for each read_columns of the source's invariants: each
    -- row's values of each set, as text (no equality operator
    -- needed), counted +1 new and -1 old; what does not add
    -- up to 0 changed. One pass over each transition table.
    -- NULL when an invariant reads every column: then the
    -- keys of every row, old and new.
    SELECT pg_catalog.string_agg(pg_catalog.format('SELECT %s AS source, (%s)::text AS key FROM __pgconsistency_rows__ r', x.id, x.expr),
                                 ' UNION ALL ' ORDER BY x.id),
           pg_catalog.string_agg(coalesce(w.updated, pg_catalog.format(
                                     'SELECT %1$s AS source, (%2$s)::text AS key, NULL::text[] AS read_columns FROM new_rows r'
                                     ' UNION ALL SELECT %1$s, (%2$s)::text, NULL FROM old_rows r', x.id, x.expr)),
                                 ' UNION ALL ' ORDER BY x.id)
      INTO v_rows, v_upd
      FROM ROWS FROM (pg_catalog.unnest(ids), pg_catalog.unnest(exprs)) AS x(id, expr)
     CROSS JOIN LATERAL (SELECT
       (SELECT CASE WHEN NOT pg_catalog.bool_or(y.read_columns IS NULL) THEN
                   pg_catalog.format(
                       'SELECT %1$s AS source, d.key, d.read_columns FROM ('
                       'SELECT u.key, u.read_columns FROM ('
                       'SELECT (%2$s)::text AS key, x.read_columns, x.v, 1 AS n FROM new_rows r CROSS JOIN LATERAL (VALUES %3$s) AS x(read_columns, v)'
                       ' UNION ALL SELECT (%2$s)::text, x.read_columns, x.v, -1 FROM old_rows r CROSS JOIN LATERAL (VALUES %3$s) AS x(read_columns, v)) u'
                       ' GROUP BY u.key, u.read_columns, u.v HAVING pg_catalog.sum(u.n) <> 0) d',
                       x.id, x.expr,
                       pg_catalog.string_agg(pg_catalog.format('(%L::text[], ROW(%s)::text)', y.read_columns,
                                                 coalesce((SELECT pg_catalog.string_agg(pg_catalog.format('r.%I', u.col), ', ' ORDER BY u.col)
                                                             FROM pg_catalog.unnest(y.read_columns) AS u(col)), '')),
                                             ', ' ORDER BY y.read_columns)) END
          FROM (SELECT DISTINCT s.read_columns
                  FROM pgconsistency.invariant_key_source s
                  JOIN pgconsistency.invariant i ON i.name = s.invariant AND i.refresh_mode = 'incremental'
                 WHERE s.relation = rel::text AND s.key_expression = x.expr) AS y) AS updated) AS w;
    -- The comparison names the columns read: one renamed or dropped
    -- since would make it fail, and the application's UPDATE with it.
    -- So it runs only while each still has its name at its place (attnum,
    -- as now); otherwise every updated row's keys, as before 0.7.5 (the
    -- invariant's query fails too, and its next definition compares what
    -- it reads then). pg_identify_object_as_address reads the system
    -- cache: no query in the writer's statement (until 0.7.9, one on
    -- pg_attribute: 10-18 us of the 60 us the capture added to a one-row
    -- UPDATE, BENCHMARKS.md).
    SELECT CASE WHEN pg_catalog.bool_and(a.attnum IS NOT NULL) THEN
               pg_catalog.format('ARRAY[%s] = %L::text[]',
                                 pg_catalog.string_agg(pg_catalog.format(
                                     '(pg_catalog.pg_identify_object_as_address(''pg_catalog.pg_class''::pg_catalog.regclass, TG_RELID, %s)).object_names[3]',
                                     a.attnum), ', ' ORDER BY c.col),
                                 pg_catalog.array_agg(c.col ORDER BY c.col))
               ELSE 'false' END
      INTO v_compared
      FROM (SELECT DISTINCT x.col
              FROM pgconsistency.invariant_key_source s
              JOIN pgconsistency.invariant i ON i.name = s.invariant AND i.refresh_mode = 'incremental'
             CROSS JOIN LATERAL pg_catalog.unnest(s.read_columns) AS x(col)
             WHERE s.relation = rel::text) AS c
      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attname = c.col AND a.attnum > 0 AND NOT a.attisdropped
    HAVING pg_catalog.count(*) > 0;
    RETURN pg_catalog.format($b$
-- Generated by pgconsistency._install_capture() for %1$s: do not edit.
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%2$s) c WHERE c.key IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%3$s) c WHERE c.key IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' AND %6$s THEN
        INSERT INTO pgconsistency.captured_key (source, key, read_columns)
        SELECT DISTINCT c.source, c.key, c.read_columns FROM (%5$s) c WHERE c.key IS NOT NULL;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pgconsistency.captured_key (source, key)
        SELECT DISTINCT c.source, c.key FROM (%2$s UNION ALL %3$s) c WHERE c.key IS NOT NULL;
    ELSE
        INSERT INTO pgconsistency.capture_gap (relation, reason, at)
        VALUES (%4$L, 'TRUNCATE ' || %4$L, pg_catalog.clock_timestamp());
    END IF;
    RETURN NULL;
END
$b$, rel, pg_catalog.replace(v_rows, ' FROM __pgconsistency_rows__ r', ' FROM new_rows r'),
        pg_catalog.replace(v_rows, ' FROM __pgconsistency_rows__ r', ' FROM old_rows r'), rel::text, v_upd,
        coalesce(v_compared, 'true'));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._generated_capture_function(regclass, integer[], text[]) IS
  'Internal: the text of the capture function of a table, for its capture sources';

-- _install_capture: make the capture triggers match the invariants in
-- incremental mode. For each table one of them reads: a function
-- pgconsistency._capture_<table oid> (replaced only when its text changes:
-- that takes no lock on the table) and four statement-level triggers, AFTER
-- INSERT, UPDATE and DELETE with transition tables, which write the keys of
-- the changed rows to captured_key once per statement, and AFTER TRUNCATE,
-- which records a gap. The triggers are ENABLE ALWAYS: writes under
-- session_replication_role = replica (logical replication, some restores)
-- are captured too. Creating or dropping a trigger locks its table against
-- writes: each waits at most 200 ms at a time (_install_ddl), and only when
-- one is missing, disabled or no longer needed.
CREATE OR REPLACE FUNCTION pgconsistency._install_capture() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t       record;
    v_fn    text;
    v_body  text;
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
               -- with the WAL capture (07_wal_capture.sql), no triggers
               AND (SELECT m.method FROM pgconsistency.capture m) = 'trigger'
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
        v_fn := pg_catalog.format('pgconsistency._capture_%s', t.rel::oid);
        IF t.ids IS NULL THEN
            -- No invariant in incremental mode reads it any more.
            FOR v_trig IN SELECT g.tgname FROM pg_catalog.pg_trigger g
                           WHERE g.tgrelid = t.rel AND g.tgname LIKE 'pgconsistency\_capture\_%' AND NOT g.tgisinternal LOOP
                PERFORM pgconsistency._install_ddl(pg_catalog.format('DROP TRIGGER %I ON %s', v_trig.tgname, t.rel));
            END LOOP;
            EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s()', v_fn);
            CONTINUE;
        END IF;
        v_body := pgconsistency._generated_capture_function(t.rel, t.ids, t.exprs);
        IF pg_catalog.to_regprocedure(v_fn || '()') IS NULL
           OR (SELECT p.prosrc FROM pg_catalog.pg_proc p WHERE p.oid = pg_catalog.to_regprocedure(v_fn || '()')) IS DISTINCT FROM v_body THEN
            -- SECURITY DEFINER: the application's roles write the keys
            -- without any privilege on pgconsistency's tables.
            EXECUTE pg_catalog.format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                                      'SET search_path = pg_catalog, pg_temp AS %L', v_fn, v_body);
            EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', v_fn);
            EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s() IS %L', v_fn,
                                      'Internal: capture of the keys of rows changed in ' || t.rel::text || ' (generated by _install_capture)');
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
                PERFORM pgconsistency._install_ddl(pg_catalog.format('CREATE TRIGGER %I ' || v_trig.ddl || ' FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                                                                    v_trig.name, t.rel, v_fn));
            END IF;
            IF v_trig.tgenabled IS DISTINCT FROM 'A' THEN
                PERFORM pgconsistency._install_ddl(pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.rel, v_trig.name));
            END IF;
        END LOOP;
    END LOOP;
    -- The functions of tables dropped since (a migration that re-created a
    -- table gives it a new oid, and a new function).
    FOR v_trig IN
        SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.proname ~ '^_capture_[0-9]+$'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgfoid = p.oid)
    LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', v_trig.fn);
    END LOOP;
    INSERT INTO pgconsistency.capture_epoch (started_at) VALUES (pg_catalog.clock_timestamp())
    ON CONFLICT ON CONSTRAINT capture_epoch_pkey DO NOTHING;
    -- The WAL capture builds its read statement again at its next read.
    UPDATE pgconsistency.capture SET read_statement = NULL WHERE read_statement IS NOT NULL;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_capture() IS
  'Internal: create, update or drop the capture triggers to match the invariants in incremental mode';

-- set_refresh_mode: 'incremental' re-checks, on each refresh, only the keys
-- of the rows written since the previous one (captured by triggers in the
-- writers' transactions; see _install_capture), with a full refresh that
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
    v_old  text;
    v_hint text;
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
        PERFORM pgconsistency._check_incremental(invariant);
        v_hint := pgconsistency._incremental_index_hint(invariant);
        IF v_hint IS NOT NULL THEN
            RAISE NOTICE 'pgconsistency: some tables % reads have no index on its key: its incremental refreshes read them whole, joining the changed keys by hash, and cost about as much as a full one', invariant
                USING HINT = 'Lookups by key need: ' || v_hint;
        END IF;
        INSERT INTO pgconsistency.capture_state (invariant, since, reconcile_reason)
        VALUES (invariant, pg_catalog.clock_timestamp(), pgconsistency._reconcile_reason_started())
        ON CONFLICT ON CONSTRAINT capture_state_pkey DO NOTHING;
    ELSE
        DELETE FROM pgconsistency.capture_state c WHERE c.invariant = set_refresh_mode.invariant;
        DELETE FROM pgconsistency.pending_key p WHERE p.invariant = set_refresh_mode.invariant;
    END IF;
    UPDATE pgconsistency.invariant i SET refresh_mode = set_refresh_mode.mode
     WHERE i.name = set_refresh_mode.invariant AND i.refresh_mode IS DISTINCT FROM set_refresh_mode.mode;
    PERFORM pgconsistency._install_capture();
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.refresh_mode = 'incremental') THEN
        DELETE FROM pgconsistency.captured_key; -- no trigger writes there any more, no refresh would move them
    END IF;
    RETURN v_old;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.set_refresh_mode(text, text) IS
  'Refresh an invariant incrementally (only the keys writes touched, reconciled by a full refresh every full_refresh_period) or fully';

-- _dispatch_captured_keys: move the captured keys to the pending keys of
-- each invariant in incremental mode that they concern; turn capture gaps
-- (TRUNCATE) and a lost capture (crash, failover: the unlogged tables are
-- empty) into reconciles. The keys a writer committed before this
-- statement are moved; later ones stay for the next refresh, which then
-- sees their rows. One session at a time; another one skips (the keys wait
-- for the next refresh). Internal to refresh_invariant.
CREATE OR REPLACE FUNCTION pgconsistency._dispatch_captured_keys() RETURNS void
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
    -- (0.7.5: pgconsistency_moved_keys, with the columns; a session of
    -- before the upgrade keeps its pgconsistency_moved of two.)
    PERFORM pgconsistency._work_table('pgconsistency_moved_keys', 'source integer, key text, read_columns text[]');
    WITH moved AS (
        DELETE FROM pgconsistency.captured_key k RETURNING k.source, k.key, k.read_columns)
    INSERT INTO pg_temp.pgconsistency_moved_keys SELECT moved.source, moved.key, moved.read_columns FROM moved;
    -- A key of an UPDATE goes to the invariants that read the columns
    -- that changed (read_columns; NULL: to all).
    INSERT INTO pgconsistency.pending_key (invariant, key)
    SELECT DISTINCT s.invariant, m.key
      FROM pg_temp.pgconsistency_moved_keys m
      JOIN pgconsistency.capture_source c ON c.id = m.source
      JOIN pgconsistency.invariant_key_source s ON s.relation = c.relation AND s.key_expression = c.key_expression
                                                AND (m.read_columns IS NULL OR m.read_columns = s.read_columns)
      JOIN pgconsistency.capture_state cs ON cs.invariant = s.invariant
     WHERE s.key_lookup IS NULL;
    -- Keys found through another table, looked up now, in this snapshot.
    FOR l IN
        SELECT s.invariant, s.key_lookup, pg_catalog.array_agg(DISTINCT m.key) AS vals
          FROM pg_temp.pgconsistency_moved_keys m
          JOIN pgconsistency.capture_source c ON c.id = m.source
          JOIN pgconsistency.invariant_key_source s ON s.relation = c.relation AND s.key_expression = c.key_expression
                                                    AND (m.read_columns IS NULL OR m.read_columns = s.read_columns)
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
COMMENT ON FUNCTION pgconsistency._dispatch_captured_keys() IS
  'Internal: move captured keys to the pending keys of the invariants in incremental mode';

-- _reconcile_reason: why the next refresh of an invariant in incremental
-- mode must be a full one, or NULL: a reason recorded in capture_state, a
-- capture trigger missing or not ENABLE ALWAYS on a table it reads, or
-- full_refresh_period passed since the latest full refresh.
CREATE OR REPLACE FUNCTION pgconsistency._reconcile_reason(invariant text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_reason text;
    v_found  boolean;
BEGIN
    SELECT c.reconcile_reason, true INTO v_reason, v_found FROM pgconsistency.capture_state c WHERE c.invariant = _reconcile_reason.invariant;
    IF v_found IS NULL THEN
        RETURN 'it has no capture state (run set_refresh_mode again)';
    END IF;
    IF v_reason IS NOT NULL THEN
        RETURN v_reason;
    END IF;
    IF (SELECT m.method FROM pgconsistency.capture m) = 'wal' THEN
        -- The WAL capture: its slot must be readable (capture_wal creates
        -- a lost one again and records the reconcile), and the WAL must
        -- hold the key columns of the rows deleted from the tables read.
        -- (Only this invariant's tables and key columns: every refresh
        -- asks, so not wal_capture_tables(), which judges them all.)
        SELECT coalesce(pgconsistency._wal_slot_problem(m.slot_name), t.problem) INTO v_reason
          FROM pgconsistency.capture m
          LEFT JOIN LATERAL (
              SELECT pg_catalog.format('the WAL does not hold the key columns of the rows deleted from %s (run %s)',
                                       k.rel, pgconsistency._replica_identity_fix(k.rel, k.cols)) AS problem
                FROM (SELECT pg_catalog.to_regclass(s.relation) AS rel, pg_catalog.array_agg(DISTINCT c.col) AS cols
                        FROM pgconsistency.invariant_key_source s
                       CROSS JOIN LATERAL pg_catalog.unnest(pgconsistency._key_columns(pg_catalog.to_regclass(s.relation), s.key_expression)) AS c(col)
                       WHERE s.invariant = _reconcile_reason.invariant AND pg_catalog.to_regclass(s.relation) IS NOT NULL
                       GROUP BY 1) k
               WHERE NOT k.cols <@ pgconsistency._replica_identity_columns(k.rel)
               ORDER BY k.rel::text LIMIT 1) t ON true;
        IF v_reason IS NOT NULL THEN
            RETURN v_reason;
        END IF;
    END IF;
    SELECT pg_catalog.format('capture trigger %s on %s is %s', w.name, s.relation,
                             CASE WHEN pg_catalog.to_regclass(s.relation) IS NULL THEN 'gone with its table'
                                  WHEN g.tgenabled IS NULL THEN 'missing' ELSE 'not ENABLE ALWAYS' END)
      INTO v_reason
      FROM pgconsistency.invariant_key_source s
     CROSS JOIN (VALUES ('pgconsistency_capture_insert'), ('pgconsistency_capture_update'),
                        ('pgconsistency_capture_delete'), ('pgconsistency_capture_truncate')) AS w(name)
      LEFT JOIN pg_catalog.pg_trigger g ON g.tgrelid = pg_catalog.to_regclass(s.relation) AND g.tgname = w.name
     WHERE s.invariant = _reconcile_reason.invariant AND g.tgenabled IS DISTINCT FROM 'A'
       AND (SELECT m.method FROM pgconsistency.capture m) = 'trigger'
     ORDER BY s.relation, w.name
     LIMIT 1;
    IF v_reason IS NOT NULL THEN
        RETURN v_reason || ' (run pgconsistency.set_refresh_mode(' || pg_catalog.quote_literal(invariant) || ', ''incremental'') to restore it)';
    END IF;
    SELECT 'the periodic reconcile (full_refresh_period ' || i.full_refresh_period || ')' INTO v_reason
      FROM pgconsistency.invariant i
      LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
     WHERE i.name = _reconcile_reason.invariant
       AND (s.last_full_refresh_at IS NULL OR s.last_full_refresh_at <= pg_catalog.clock_timestamp() - i.full_refresh_period);
    RETURN v_reason;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._reconcile_reason(text) IS
  'Internal: why an invariant in incremental mode needs a full refresh now, or NULL';

