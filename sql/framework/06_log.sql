-- pgconsistency framework: the log of new anomalies. Each log consumer (a
-- receiver in a logs pipeline) reads the anomalies that appeared since its
-- cursor, then moves the cursor: each anomaly is delivered once.

-- _log_cursor_owned: the cursor of a log consumer, locked, after checking
-- that the calling role (the login role: session_user, since the callers are
-- SECURITY DEFINER) may use it: its owner, or a role with the privileges of
-- pgconsistency's owner. A cursor without an owner (made before 0.2.0) is
-- taken over by its next user. NULL when the consumer has no cursor yet.
-- Internal to new_anomalies_for_log and advance_log_cursor.
CREATE OR REPLACE FUNCTION pgconsistency._log_cursor_owned(consumer text) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_owner text;
    v_last  bigint;
BEGIN
    SELECT c.owner, c.last_seq INTO v_owner, v_last
      FROM pgconsistency.log_cursor c WHERE c.consumer = _log_cursor_owned.consumer FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_owner IS NULL THEN
        UPDATE pgconsistency.log_cursor c SET owner = session_user WHERE c.consumer = _log_cursor_owned.consumer;
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
COMMENT ON FUNCTION pgconsistency._log_cursor_owned(text) IS
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
    v_last    bigint := pgconsistency._log_cursor_owned(consumer);
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

-- new_anomalies_with_origin_for_log (0.6.0): new_anomalies_for_log, the
-- same rows under the same cursor, with where each anomaly came from (see
-- the anomaly_origin view): the deployment it appeared after, the reason of
-- the refresh request that found it, and the audited change that caused it
-- (NULL: no cause recorded). The receiver calls it where it exists, and
-- new_anomalies_for_log on older installs; new_anomalies_for_log keeps its
-- signature (and its grants).
CREATE OR REPLACE FUNCTION pgconsistency.new_anomalies_with_origin_for_log(consumer text, max_rows integer)
RETURNS TABLE (seq bigint, invariant text, severity text, key text, details jsonb, first_seen_at timestamptz,
               deploy_marker text, deployed_at timestamptz, deployed_since_previous_refresh boolean,
               refresh_reason text, cause_audit_id bigint, cause_operation text, cause_table text,
               cause_txid bigint, cause_changed_at timestamptz, cause_db_user text,
               cause_application_name text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
        SELECT l.seq, l.invariant, l.severity, l.key, l.details, l.first_seen_at,
               a.deploy_marker, a.deployed_at, a.deployed_since_previous_refresh, a.refresh_reason,
               a.cause_audit_id, a.cause_operation, a.cause_table, a.cause_txid, a.cause_changed_at,
               a.cause_db_user, a.cause_application_name
          FROM pgconsistency.new_anomalies_for_log(new_anomalies_with_origin_for_log.consumer,
                                                   new_anomalies_with_origin_for_log.max_rows) l
          JOIN pgconsistency.anomaly a ON a.seq = l.seq AND a.invariant = l.invariant AND a.key = l.key
         ORDER BY l.seq;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.new_anomalies_with_origin_for_log(text, integer) IS
  'new_anomalies_for_log with each anomaly''s deployment, refresh reason and audited cause (0.6.0)';

-- advance_log_cursor: the consumer delivered every record up to seq.
CREATE OR REPLACE FUNCTION pgconsistency.advance_log_cursor(consumer text, seq bigint) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pgconsistency._log_cursor_owned(consumer) IS NULL THEN
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

