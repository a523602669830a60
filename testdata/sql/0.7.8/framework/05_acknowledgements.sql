-- pgconsistency framework: the counts of open anomalies, and their
-- acknowledgements: an acknowledged anomaly is counted apart (in
-- acknowledged_anomalies) until it is resolved or its "until" passes.
-- The lifecycle of anomalies (new, resolved, back again) is written by the
-- refresh (refresh_invariant, 08_refresh.sql).

-- _open_counts: the open anomalies of an invariant, not acknowledged and
-- acknowledged (an acknowledgement past its "until" no longer counts).
-- O(open anomalies of the invariant), through the partial index.
CREATE OR REPLACE FUNCTION pgconsistency._open_counts(invariant text, OUT unacknowledged bigint, OUT acknowledged bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT count(*) FILTER (WHERE NOT a.is_acknowledged), count(*) FILTER (WHERE a.is_acknowledged)
      INTO unacknowledged, acknowledged
      FROM (SELECT a.acknowledged_at IS NOT NULL AND (a.acknowledged_until IS NULL OR a.acknowledged_until > pg_catalog.now()) AS is_acknowledged
              FROM pgconsistency.anomaly a
             WHERE a.invariant = _open_counts.invariant AND a.resolved_at IS NULL) a;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._open_counts(text) IS
  'Internal: the open anomalies of an invariant, not acknowledged and acknowledged';

-- _recount: bring the stored counts of an invariant up to date after an
-- acknowledgement changed, so the status view stays a read of stored numbers.
CREATE OR REPLACE FUNCTION pgconsistency._recount(invariant text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE pgconsistency.refresh_state s
       SET anomalies = c.unacknowledged, acknowledged_anomalies = c.acknowledged
      FROM pgconsistency._open_counts(_recount.invariant) c
     WHERE s.invariant = _recount.invariant
$fn$;
COMMENT ON FUNCTION pgconsistency._recount(text) IS
  'Internal: bring the stored counts of an invariant up to date after an acknowledgement changed';

-- _acknowledge_open: the one place acknowledgements are given. key NULL means
-- every anomaly open now in the invariant. Internal: use acknowledge() or
-- acknowledge_all().
CREATE OR REPLACE FUNCTION pgconsistency._acknowledge_open(
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
    IF NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i WHERE i.name = _acknowledge_open.invariant) THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    UPDATE pgconsistency.anomaly a
       SET acknowledged_at = pg_catalog.now(), acknowledged_by = session_user,
           acknowledged_reason = _acknowledge_open.reason, acknowledged_until = _acknowledge_open.until
     WHERE a.invariant = _acknowledge_open.invariant AND a.resolved_at IS NULL
       AND (_acknowledge_open.key IS NULL OR a.key = _acknowledge_open.key);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count = 0 AND key IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: no open anomaly % in invariant %', pg_catalog.quote_literal(key), pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT key FROM pgconsistency.anomaly WHERE invariant = ... AND resolved_at IS NULL lists the open ones.';
    END IF;
    PERFORM pgconsistency._recount(invariant);
    RETURN v_count;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._acknowledge_open(text, text, text, timestamptz) IS
  'Internal: acknowledge one open anomaly of an invariant, or all of them (key NULL); use acknowledge() or acknowledge_all()';

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
    SELECT pgconsistency._acknowledge_open(acknowledge.invariant, acknowledge.key, acknowledge.reason, acknowledge.until)
$fn$;
COMMENT ON FUNCTION pgconsistency.acknowledge(text, text, text, timestamptz) IS
  'Take a known, open anomaly out of the anomalies counted (into the acknowledged ones) until it is resolved, or until "until"';

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
    SELECT pgconsistency._acknowledge_open(acknowledge_all.invariant, NULL, acknowledge_all.reason, acknowledge_all.until)
$fn$;
COMMENT ON FUNCTION pgconsistency.acknowledge_all(text, text, timestamptz) IS
  'Acknowledge every anomaly open now in one invariant, with one reason; anomalies appearing later count';

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
       SET acknowledged_at = NULL, acknowledged_by = NULL, acknowledged_reason = NULL, acknowledged_until = NULL
     WHERE a.invariant = unacknowledge.invariant AND a.key = unacknowledge.key AND a.acknowledged_at IS NOT NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM pgconsistency._recount(invariant);
    RETURN v_count;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.unacknowledge(text, text) IS
  'Withdraw the acknowledgement of an anomaly: it counts again';

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
           SET acknowledged_at = NULL, acknowledged_by = NULL, acknowledged_reason = NULL, acknowledged_until = NULL
         WHERE a.acknowledged_until <= pg_catalog.now()
        RETURNING a.invariant)
    SELECT pg_catalog.array_agg(DISTINCT e.invariant), count(*) INTO v_invariants, v_count FROM expired e;
    FOREACH v_name IN ARRAY coalesce(v_invariants, '{}') LOOP
        PERFORM pgconsistency._recount(v_name);
    END LOOP;
    RETURN v_count;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.expire_acknowledgements() IS
  'End the acknowledgements past their "until" and update the counts; refresh_plan() runs it on every call';

