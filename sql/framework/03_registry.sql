-- pgconsistency framework: the registry. Invariants are defined from a
-- query (define_invariant) or registered as a materialized view of the
-- user's (register_invariant); their parameters (define_parameter,
-- set_parameter, parameter); their owners (set_owner); what packs and
-- migrations call around them (requires, release_table).

-- _check_owner: the owner and runbook_url given for an invariant, checked
-- with a message that names the problem and the fix (the table's CHECK
-- constraints say the same, tersely). NULL is always fine: unset.
CREATE OR REPLACE FUNCTION pgconsistency._check_owner(invariant text, owner text, runbook_url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF owner IS NOT NULL AND (owner !~ '^\S(.*\S)?$' OR owner ~ '[[:cntrl:]]' OR pg_catalog.length(owner) > 128) THEN
        RAISE EXCEPTION 'pgconsistency: owner of invariant % is %, which is not a valid owner',
            invariant, pg_catalog.quote_literal(owner)
            USING HINT = 'An owner is a team or person name of 1 to 128 characters, without leading or trailing '
                         'blanks nor control characters, e.g. ''team-a''; NULL leaves it unset.';
    END IF;
    IF runbook_url IS NOT NULL AND (runbook_url !~ '^https?://\S+$' OR pg_catalog.length(runbook_url) > 2048) THEN
        RAISE EXCEPTION 'pgconsistency: runbook_url of invariant % is %, which is not an http(s) URL',
            invariant, pg_catalog.quote_literal(runbook_url)
            USING HINT = 'Give an absolute URL starting with https:// or http://, without blanks, at most 2048 characters, '
                         'e.g. ''https://wiki.example.com/runbooks/orders''; NULL leaves it unset.';
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._check_owner(text, text, text) IS
  'Internal: check an invariant''s owner and runbook_url, failing with a message that says what to fix';

-- _register_row: the registry row of an invariant; an unchanged registration
-- writes nothing (install.sql runs on every deploy). Internal to
-- register_invariant and define_invariant. owner and runbook_url are
-- written only where the row has none (NULL): a definition gives defaults,
-- and what set_owner() or an UPDATE set since is kept.
CREATE OR REPLACE FUNCTION pgconsistency._register_row(
    name text, view_schema text, view_name text, severity text, description text,
    owner text DEFAULT NULL, runbook_url text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF _register_row.severity IS NULL OR _register_row.severity NOT IN ('critical', 'warning', 'info') THEN
        RAISE EXCEPTION 'pgconsistency: severity of invariant % is %, expected critical, warning or info',
            name, coalesce(_register_row.severity, 'NULL');
    END IF;
    PERFORM pgconsistency._check_owner(name, owner, runbook_url);
    INSERT INTO pgconsistency.invariant AS i (name, description, severity, view_schema, view_name, owner, runbook_url)
    VALUES (_register_row.name, coalesce(_register_row.description, ''), _register_row.severity,
            _register_row.view_schema, _register_row.view_name, _register_row.owner, _register_row.runbook_url)
    ON CONFLICT ON CONSTRAINT invariant_pkey DO UPDATE
       SET description = EXCLUDED.description,
           severity    = EXCLUDED.severity,
           view_schema = EXCLUDED.view_schema,
           view_name   = EXCLUDED.view_name,
           owner       = coalesce(i.owner, EXCLUDED.owner),
           runbook_url = coalesce(i.runbook_url, EXCLUDED.runbook_url)
     WHERE (i.description, i.severity, i.view_schema, i.view_name,
            coalesce(i.owner, EXCLUDED.owner), coalesce(i.runbook_url, EXCLUDED.runbook_url))
           IS DISTINCT FROM (EXCLUDED.description, EXCLUDED.severity, EXCLUDED.view_schema, EXCLUDED.view_name,
                             i.owner, i.runbook_url);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._register_row(text, text, text, text, text, text, text) IS
  'Internal: insert or update the registry row of an invariant, writing nothing when unchanged and keeping a set owner';

-- _query_shape: what an invariant's query returns and reads, from a
-- temporary view of it (which also checks that it parses and that what it
-- reads exists): its columns but key, as "name type, ..." for
-- jsonb_to_record (NULL when key is its only column), whether it has a
-- column key of type text, the relations it reads (schema-qualified), and
-- the columns it reads of each, as {"schema.table": ["column", ...], ...}:
-- the dependencies PostgreSQL records for the view (one per column read,
-- one per relation). read_columns is NULL when the query reads a row whole
-- (to_jsonb(t), t::text) or a system column (ctid, xmin): a Var of no
-- column, or of a negative one, in the view's tree; then any change to a
-- row may change what it sees.
CREATE OR REPLACE FUNCTION pgconsistency._query_shape(query text, OUT columns text, OUT has_key boolean, OUT relations text[],
                                                     OUT key_collation text, OUT read_columns jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_probe regclass;
BEGIN
    IF pg_catalog.to_regclass('pg_temp.pgconsistency_query_probe') IS NOT NULL THEN
        DROP VIEW pg_temp.pgconsistency_query_probe;
    END IF;
    BEGIN
        EXECUTE 'CREATE TEMPORARY VIEW pgconsistency_query_probe AS ' || query;
    EXCEPTION WHEN undefined_table OR undefined_function OR undefined_object THEN
        -- The refresh runs the query under this search_path too: a name
        -- found by the caller's search_path would not be found then.
        RAISE EXCEPTION '%', SQLERRM USING ERRCODE = SQLSTATE,
            HINT = 'The query runs with search_path = pg_catalog, pg_temp: schema-qualify every table, type and function it names (public.dataset_statistics, not dataset_statistics).';
    END;
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
    SELECT pg_catalog.array_agg(x.rel ORDER BY x.rel),
           CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite w
                                  WHERE w.ev_class = v_probe AND w.ev_action::text ~ ':varattno (0|-[0-9]+) ')
                THEN coalesce(pg_catalog.jsonb_object_agg(x.rel, x.cols), '{}') END
      INTO relations, read_columns
      FROM (SELECT d.refobjid::regclass::text AS rel,
                   coalesce(pg_catalog.jsonb_agg(DISTINCT a.attname::text) FILTER (WHERE a.attname IS NOT NULL), '[]') AS cols
              FROM pg_catalog.pg_rewrite w
              JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = w.oid
              LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid AND d.refobjsubid > 0
             WHERE w.ev_class = v_probe
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> v_probe
             GROUP BY d.refobjid) x;
    DROP VIEW pg_temp.pgconsistency_query_probe;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._query_shape(text) IS
  'Internal: the detail columns, key column, relations and columns read of an invariant''s query';

-- _define_read_columns: the read_columns of each key source of an
-- invariant, from the columns its query reads (query_columns: the
-- read_columns of _query_shape) and those of the key expression
-- (_key_columns): NULL where either reads the row whole. Returns whether
-- any changed.
CREATE OR REPLACE FUNCTION pgconsistency._define_read_columns(name text, query_columns jsonb) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    UPDATE pgconsistency.invariant_key_source s
       SET read_columns = c.cols
      FROM (SELECT k.relation,
                   CASE WHEN query_columns IS NULL OR pgconsistency._key_reads_row(k.key_expression) THEN NULL
                        ELSE coalesce((SELECT pg_catalog.array_agg(DISTINCT x.col ORDER BY x.col)
                                         FROM (SELECT pg_catalog.jsonb_array_elements_text(coalesce(query_columns -> k.relation, '[]'))
                                               UNION ALL
                                               SELECT pg_catalog.unnest(pgconsistency._key_columns(pg_catalog.to_regclass(k.relation),
                                                                                                  k.key_expression))) AS x(col)),
                                      '{}')
                   END AS cols
              FROM pgconsistency.invariant_key_source k
             WHERE k.invariant = _define_read_columns.name AND pg_catalog.to_regclass(k.relation) IS NOT NULL) c
     WHERE s.invariant = _define_read_columns.name AND s.relation = c.relation
       AND s.read_columns IS DISTINCT FROM c.cols;
    RETURN FOUND;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._define_read_columns(text, jsonb) IS
  'Internal: store the columns each key source of an invariant reads; whether any changed';

-- _anomaly_view_sql: the definition of the view pgconsistency.<invariant>:
-- its open anomalies with the columns of its query (columns and
-- key_collation as _query_shape gives them).
CREATE OR REPLACE FUNCTION pgconsistency._anomaly_view_sql(invariant text, columns text, key_collation text) RETURNS text
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
COMMENT ON FUNCTION pgconsistency._anomaly_view_sql(text, text, text) IS
  'Internal: the definition of the view of an invariant''s open anomalies';

-- register_invariant: register an existing materialized view as an invariant.
-- Checks what REFRESH ... CONCURRENTLY needs, so a bad view fails here, at
-- install time, with a message that says what to fix, and not at 3 a.m.
-- owner and runbook_url (0.5.0): as for define_invariant.
CREATE OR REPLACE FUNCTION pgconsistency.register_invariant(
    name        text,
    view_schema text,
    view_name   text,
    severity    text DEFAULT 'warning',
    description text DEFAULT NULL,
    owner       text DEFAULT NULL,
    runbook_url text DEFAULT NULL
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
            USING HINT = 'Select the id of the entity the anomaly is about as key, e.g. dataset_id::text AS key.';
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
    -- (_register_row checks the severity)
    PERFORM pgconsistency._register_row(name, view_schema, view_name, severity, description, owner, runbook_url);
END
$fn$;
COMMENT ON FUNCTION pgconsistency.register_invariant(text, text, text, text, text, text, text) IS
  'Register (or update) an invariant whose anomalies are held by an existing materialized view';

-- _define_keys: the key mapping define_invariant(keys => ...) was given,
-- checked (each table is read by the query; each expression and lookup
-- runs) and stored in invariant_key_source when it differs from the one
-- stored; returns whether it changed.
CREATE OR REPLACE FUNCTION pgconsistency._define_keys(name text, keys jsonb, relations text[]) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_keys    jsonb;
    v_old     jsonb;
    v_changed boolean := false;
    e record;
BEGIN
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
        IF NOT pg_catalog.to_regclass(e.relation)::text = ANY (coalesce(relations, '{}')) THEN
            RAISE EXCEPTION 'pgconsistency: keys of invariant %: its query does not read %', name, e.relation
                USING HINT = pg_catalog.format('It reads: %s.', coalesce(pg_catalog.array_to_string(relations, ', '), 'nothing'));
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
      FROM pgconsistency.invariant_key_source s WHERE s.invariant = _define_keys.name;
    IF v_old IS DISTINCT FROM v_keys THEN
        DELETE FROM pgconsistency.invariant_key_source s WHERE s.invariant = _define_keys.name;
        INSERT INTO pgconsistency.invariant_key_source (invariant, relation, key_expression, key_lookup)
        SELECT _define_keys.name, k.key,
               CASE pg_catalog.jsonb_typeof(k.value) WHEN 'string' THEN k.value #>> '{}' ELSE k.value ->> 'capture' END,
               CASE pg_catalog.jsonb_typeof(k.value) WHEN 'object' THEN k.value ->> 'keys' END
          FROM pg_catalog.jsonb_each(v_keys) k;
        v_changed := true;
    END IF;
    RETURN v_changed;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._define_keys(text, jsonb, text[]) IS
  'Internal: check and store the key mapping of define_invariant(keys => ...); whether it changed';

-- define_invariant: register an invariant from its query: columns key
-- (text, NOT NULL, once per entity an anomaly is about) and any details. The
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
-- owner and runbook_url (0.5.0): who the invariant's alerts are routed to
-- and the page they link to (see set_owner). They are defaults: written
-- only where the invariant has none, so that re-running a pack keeps an
-- owner or runbook set since with set_owner() or an UPDATE. NULL (the
-- default) leaves them as they are.

CREATE OR REPLACE FUNCTION pgconsistency.define_invariant(
    name        text,
    query       text,
    severity    text DEFAULT 'warning',
    description text DEFAULT NULL,
    settings    jsonb DEFAULT NULL,
    keys        jsonb DEFAULT NULL,
    owner       text DEFAULT NULL,
    runbook_url text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_md5     text := pg_catalog.md5(query);
    v_shape   record;
    v_kind    "char";
    v_view    text;
    v_changed boolean;
    v_columns_changed boolean;
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

    PERFORM pgconsistency._check_owner(name, owner, runbook_url);

    v_shape := pgconsistency._query_shape(query);
    IF NOT v_shape.has_key THEN
        RAISE EXCEPTION 'pgconsistency: the query of invariant % has no text column "key"', name
            USING HINT = 'Select the id of the entity the anomaly is about as key, e.g. dataset_id::text AS key.';
    END IF;

    -- The view of its anomalies, with the query's columns.
    v_view := pgconsistency._anomaly_view_sql(name, v_shape.columns, v_shape.key_collation);
    IF v_kind = 'm' THEN
        -- The materialized view of a release before 0.3.0: its rows are
        -- the latest snapshot, the open anomalies' details only what each
        -- was when it appeared. The view that replaces it shows details.
        PERFORM pgconsistency._copy_snapshot(name);
    END IF;
    PERFORM pgconsistency._install_view(pg_catalog.format('pgconsistency.%I', name), v_view,
                                       'pgconsistency invariant ' || name || ': ' || coalesce(description, '')
                                       || ' (its open anomalies as of the latest refresh)');

    PERFORM pgconsistency._register_row(name, 'pgconsistency', name, severity, description, owner, runbook_url);
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

    IF keys IS NOT NULL AND pgconsistency._define_keys(name, keys, v_shape.relations) THEN
        v_changed := true;
    END IF;
    v_columns_changed := pgconsistency._define_read_columns(name, v_shape.read_columns);

    -- An invariant in incremental mode whose query or keys changed: its
    -- capture follows, and its next refresh is a full one. When only the
    -- columns read changed (an upgrade to 0.7.5 finds them): the capture
    -- follows, nothing was missed.
    IF (v_changed OR v_columns_changed) AND EXISTS (SELECT 1 FROM pgconsistency.invariant i
                              WHERE i.name = define_invariant.name AND i.refresh_mode = 'incremental') THEN
        IF v_changed THEN
            PERFORM pgconsistency._check_incremental(name);
            UPDATE pgconsistency.capture_state c
               SET reconcile_reason = coalesce(c.reconcile_reason, pgconsistency._reconcile_reason_changed())
             WHERE c.invariant = define_invariant.name;
        END IF;
        PERFORM pgconsistency._install_capture();
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.define_invariant(text, text, text, text, jsonb, jsonb, text, text) IS
  'Create or update an invariant from its query (and, for incremental refresh, how rows of its tables map to its keys; its default owner and runbook)';

-- set_owner: who answers for an invariant's alerts, and the runbook they
-- link to (0.5.0). Sets both as given (both are required, so that a call
-- never unsets a runbook by leaving it out): NULL unsets one, and then the
-- next run of a pack that defines the invariant gives it the pack's default
-- again. To change the owner only:
--   SELECT pgconsistency.set_owner(name, 'team-a', runbook_url) FROM pgconsistency.invariant WHERE name = '...';
-- What it sets is kept by every later install. The receiver reports both
-- as attributes of the invariant's metrics from its next scrape; the alert
-- rules put owner in a label that Alertmanager routes on.
--   SELECT pgconsistency.set_owner('dataset_seed_missing', 'team-a', 'https://wiki.example.com/seed');
-- Returns the previous owner.
CREATE OR REPLACE FUNCTION pgconsistency.set_owner(invariant text, owner text, runbook_url text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_previous text;
BEGIN
    SELECT i.owner INTO v_previous FROM pgconsistency.invariant i WHERE i.name = set_owner.invariant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', coalesce(pg_catalog.quote_literal(invariant), 'NULL')
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    PERFORM pgconsistency._check_owner(invariant, owner, runbook_url);
    UPDATE pgconsistency.invariant i SET owner = set_owner.owner, runbook_url = set_owner.runbook_url
     WHERE i.name = set_owner.invariant
       AND (i.owner, i.runbook_url) IS DISTINCT FROM (set_owner.owner, set_owner.runbook_url);
    RETURN v_previous;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.set_owner(text, text, text) IS
  'Set (NULL: unset) the owner an invariant''s alerts are routed to and its runbook URL; kept by later installs. Returns the previous owner';

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
COMMENT ON FUNCTION pgconsistency.parameter(text, text) IS
  'The value of a parameter of an invariant, as text (NULL if it has none of that name); for the invariant''s query';

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
COMMENT ON FUNCTION pgconsistency.define_parameter(text, text, regtype, text, text) IS
  'Declare a parameter of an invariant with its type and default; re-running keeps a value changed with set_parameter()';

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
COMMENT ON FUNCTION pgconsistency.set_parameter(text, text, text) IS
  'Change a parameter of an invariant (the value must cast to its type); applies from the invariant''s next refresh';

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
-- drop and re-create yourself. It drops nothing and returns no row (a set
-- of names, empty: kept for the deploy scripts of before 0.3.0 that read
-- the names of the views it then dropped).
CREATE OR REPLACE FUNCTION pgconsistency.release_table(relation regclass) RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v record;
BEGIN
    FOR v IN
        SELECT DISTINCT i.name, i.view_schema, i.view_name
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
        -- Only views of register_invariant() depend on application tables
        -- (install.sql converts the materialized views define_invariant()
        -- made before 0.3.0): the user's own, not dropped.
        RAISE NOTICE 'pgconsistency: %.% (invariant %) reads % but was not made by define_invariant: drop and re-create it yourself',
            v.view_schema, v.view_name, v.name, relation;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.release_table(regclass) IS
  'Before a migration that drops or rewrites a table: name the views of register_invariant() that read it (to drop and re-create); drops nothing, returns no row';

