-- pgconsistency framework: the refresh loops. One refresh loop: its plan
-- (refresh_plan: what is due, and due requests, expired acknowledgements;
-- refresh_changes_plan: what writes changed) moves the captured keys to the
-- invariants and lists what to refresh, then refresh_invariant()
-- (08_refresh.sql) refreshes each invariant in a transaction of its own.
-- CALL pgconsistency.refresh() runs that loop; pg_cron and the receiver's
-- scheduler run it too, the scheduler one statement at a time.

-- _wal_read_period: how often the changes loop reads the WAL capture's
-- slot: the shortest incremental_period of the enabled invariants in
-- incremental mode. NULL with the trigger capture, or no such invariant.
CREATE OR REPLACE FUNCTION pgconsistency._wal_read_period() RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT pg_catalog.min(i.incremental_period)
          FROM pgconsistency.invariant i
         WHERE i.enabled AND i.refresh_mode = 'incremental'
           AND (SELECT m.method FROM pgconsistency.capture m) = 'wal');
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_read_period() IS
  'Internal: how often the changes loop reads the WAL capture''s slot (the shortest incremental_period), or NULL';

-- _wal_read_due: whether the changes loop reads the WAL capture's slot now:
-- its previous read (capture.read_at) was at least _wal_read_period() ago
-- (by _refresh_due, a tenth early), or there was none. Always true with the
-- trigger capture (capture_wal then reads nothing).
CREATE OR REPLACE FUNCTION pgconsistency._wal_read_due(at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN coalesce(pgconsistency._refresh_due(
               (SELECT m.read_at FROM pgconsistency.capture m WHERE m.method = 'wal'), pgconsistency._wal_read_period(), at), true);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._wal_read_due(timestamptz) IS
  'Internal: whether the changes loop reads the WAL capture''s slot now (at most once per the shortest incremental_period)';

-- _changed_invariants: the enabled invariants in incremental mode with
-- something to do now: keys pending (their tables were written) or a
-- reconcile recorded (capture_state), and whose incremental_period has
-- passed since their latest refresh started. The others are left alone,
-- whatever they cost: their snapshot is still exact. With the WAL capture,
-- keys come with the reads of the slot (_wal_read_due: one per the shortest
-- incremental_period), and a refresh starts some time after the read whose
-- keys it took (the plan, the refreshes listed before it): so up to half
-- the shortest period early, lest the refresh fall one pass of the changes
-- loop behind the read, and its keys one read behind.
CREATE OR REPLACE FUNCTION pgconsistency._changed_invariants(at timestamptz) RETURNS TABLE (name text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
        SELECT i.name
          FROM pgconsistency.invariant i
          JOIN pgconsistency.capture_state c ON c.invariant = i.name
          LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
         CROSS JOIN (SELECT pgconsistency._wal_read_period() / 2 AS early) AS w
         WHERE i.enabled AND i.refresh_mode = 'incremental'
           AND (c.reconcile_reason IS NOT NULL OR EXISTS (SELECT 1 FROM pgconsistency.pending_key p WHERE p.invariant = i.name))
           AND pgconsistency._refresh_due(s.last_started_at, i.incremental_period, at + coalesce(w.early, interval '0'));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._changed_invariants(timestamptz) IS
  'Internal: the invariants in incremental mode whose tables were written (or that must reconcile), due by their incremental_period';

-- refresh_changes_plan: the first step of a refresh loop that refreshes
-- changes only, within seconds of their commit (the receiver's, every
-- refresh::changes_interval, beside its loop of refresh_plan): captures
-- (capture_wal) and dispatches the keys written since the previous plan,
-- then lists the invariants of _changed_invariants, each to pass to
-- refresh_invariant(name, forced) in a transaction of its own. No request
-- is claimed, no acknowledgement expired: that is refresh_plan's. On a
-- standby it returns nothing.
-- The slot is read at most once per the shortest incremental_period
-- (_wal_read_due): no invariant can be refreshed more often, and every read
-- has a price of its own beside the changes it decodes (PostgreSQL decodes
-- again from the slot's restart point, which moves only when the server logs
-- a snapshot of its transactions, every 15 s: up to 15 s of WAL per read).
CREATE OR REPLACE FUNCTION pgconsistency.refresh_changes_plan()
RETURNS TABLE (name text, forced boolean, statement_timeout_ms bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RETURN;
    END IF;
    IF pgconsistency._wal_read_due(pg_catalog.clock_timestamp()) THEN
        PERFORM pgconsistency.capture_wal(); -- first, as in refresh_plan
    END IF;
    PERFORM pgconsistency._dispatch_captured_keys();
    RETURN QUERY
        SELECT i.name, true, (EXTRACT(epoch FROM i.statement_timeout) * 1000)::bigint
          FROM pgconsistency._changed_invariants(pg_catalog.clock_timestamp()) c
          JOIN pgconsistency.invariant i ON i.name = c.name
         ORDER BY i.name;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_changes_plan() IS
  'First step of a refresh loop for changes only: capture and dispatch the changed keys, list the invariants they concern';

-- _incremental_index_hint: for an invariant in incremental mode, the
-- CREATE INDEX statements of the tables it reads whose key column leads no
-- valid index (a schema that lost one), or NULL when every key has one.
-- Keys of several columns, or found through a lookup, are not judged.
CREATE OR REPLACE FUNCTION pgconsistency._incremental_index_hint(invariant text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN (
        SELECT pg_catalog.string_agg(pg_catalog.format('CREATE INDEX CONCURRENTLY ON %s (%I);', k.rel, k.cols[1]), ' ' ORDER BY k.rel::text)
          FROM (SELECT pg_catalog.to_regclass(s.relation) AS rel,
                       pgconsistency._key_columns(pg_catalog.to_regclass(s.relation), s.key_expression) AS cols
                  FROM pgconsistency.invariant_key_source s
                 WHERE s.invariant = _incremental_index_hint.invariant AND s.key_lookup IS NULL
                   AND pg_catalog.to_regclass(s.relation) IS NOT NULL) k
         WHERE pg_catalog.cardinality(k.cols) = 1
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.rel AND a.attname = k.cols[1]
                            WHERE i.indrelid = k.rel AND i.indisvalid AND i.indpred IS NULL AND i.indkey[0] = a.attnum));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._incremental_index_hint(text) IS
  'Internal: CREATE INDEX statements for the tables of an invariant whose key no index leads, or NULL';

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
    -- The changes captured so far go to the invariants they concern
    -- (first: the WAL capture may have to create its slot again, which
    -- PostgreSQL allows only before the transaction writes).
    PERFORM pgconsistency.capture_wal();
    PERFORM pgconsistency._dispatch_captured_keys();
    IF refresh_plan.invariant IS NULL AND pgconsistency.claim_refresh_request() THEN
        v_force := true;
    END IF;
    PERFORM pgconsistency.expire_acknowledgements();
    -- Due: its refresh_period passed, or (incremental mode) its tables were
    -- written or it must reconcile, and its incremental_period passed.
    RETURN QUERY
        SELECT i.name, v_force OR c.name IS NOT NULL, (EXTRACT(epoch FROM i.statement_timeout) * 1000)::bigint
          FROM pgconsistency.invariant i
          LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
          LEFT JOIN pgconsistency._changed_invariants(v_now) c ON c.name = i.name
         WHERE CASE WHEN refresh_plan.invariant IS NOT NULL THEN i.name = refresh_plan.invariant
                    ELSE i.enabled AND (v_force OR c.name IS NOT NULL
                                        OR pgconsistency._refresh_due(s.last_started_at, i.refresh_period, v_now)) END
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
    v_read  bigint;
BEGIN
    -- The WAL capture first (nothing when it is not in use): the keys
    -- committed so far, a transaction per read.
    LOOP
        v_read := pgconsistency.capture_wal();
        COMMIT;
        EXIT WHEN v_read IS NULL OR v_read < 100000;
    END LOOP;
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

