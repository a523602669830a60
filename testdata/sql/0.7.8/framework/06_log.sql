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
               d.marker, d.changed_at, a.deployed_since_previous_refresh, a.refresh_reason,
               a.cause_audit_id, a.cause_operation, a.cause_table, a.cause_txid, a.cause_changed_at,
               a.cause_db_user, a.cause_application_name
          FROM pgconsistency.new_anomalies_for_log(new_anomalies_with_origin_for_log.consumer,
                                                   new_anomalies_with_origin_for_log.max_rows) l
          JOIN pgconsistency.anomaly a ON a.seq = l.seq AND a.invariant = l.invariant AND a.key = l.key
          LEFT JOIN pgconsistency.deployment d ON d.id = a.deployment_id
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


-- The finished refresh requests (0.6.0): one log record per requested
-- refresh (after a deployment) once it has finished, saying per invariant
-- how many anomalies it found, so that "the deployment was clean" is a fact.
--
-- A claimed request has finished when every invariant enabled now has a
-- run (refresh_state) that started at or after its claim: refresh_state is
-- written when a run commits, so such a run has ended. A request stays
-- unfinished while an invariant has none (e.g. its run was skipped because
-- a refresh that started before the claim held it): it is reported after
-- that invariant's next refresh. A request followed by another claimed one
-- is finished too (superseded): what its refresh reached is known from the
-- runs that started between its claim and the next one (refresh_state
-- keeps only each invariant's latest run) and from the anomalies first
-- seen then; the other invariants are listed as not refreshed, since
-- unknown is not clean. Requests are claimed in the order of their ids (at
-- most one is pending, and the next one is made only once it is claimed),
-- so only the latest claimed one can be unfinished, and a cursor on ids
-- never passes a request that is yet to finish.

-- _finished_requests: the claimed requests after after_id whose refresh
-- has finished, oldest first, at most max_rows (NULL: all). new_anomalies
-- and invariants count the anomalies first seen by the requested runs:
-- first_seen_at (the start of the run that found them) from the claim to
-- finished_at (superseded: to the next claim), among those still kept
-- (open, or resolved within their invariant's resolved_retention), through
-- the index anomaly_first_seen. Internal to finished_requests_for_log.
CREATE OR REPLACE FUNCTION pgconsistency._finished_requests(after_id bigint, max_rows integer)
RETURNS TABLE (request_id bigint, reason text, requests integer, claimed_at timestamptz, finished_at timestamptz,
               superseded boolean, deployment_id bigint, deploy_marker text, deployed_at timestamptz,
               new_anomalies bigint, invariants jsonb, not_refreshed text[], not_clean text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r          record;
    v_all_ran  boolean;
    v_finished timestamptz;
    v_until    timestamptz;
    v_rows     integer := 0;
BEGIN
    FOR r IN
        SELECT q.id, q.reason, q.requests, q.claimed_at,
               (SELECT n.claimed_at FROM pgconsistency.refresh_request n
                 WHERE n.id > q.id AND n.claimed_at IS NOT NULL ORDER BY n.id LIMIT 1) AS next_claimed_at
          FROM pgconsistency.refresh_request q
         WHERE q.id > after_id AND q.claimed_at IS NOT NULL
         ORDER BY q.id
    LOOP
        EXIT WHEN max_rows IS NOT NULL AND v_rows >= max_rows;
        -- the runs of the request: started since its claim (and before the next claim)
        SELECT coalesce(pg_catalog.bool_and(coalesce(s.last_started_at >= r.claimed_at, false)), true),
               pg_catalog.max(s.last_finished_at)
                   FILTER (WHERE s.last_started_at >= r.claimed_at
                             AND (r.next_claimed_at IS NULL OR s.last_started_at < r.next_claimed_at))
          INTO v_all_ran, v_finished
          FROM pgconsistency.invariant i
          LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
         WHERE i.enabled;
        IF r.next_claimed_at IS NULL AND NOT v_all_ran THEN
            EXIT; -- still running: the latest claimed request
        END IF;
        IF r.next_claimed_at IS NULL THEN
            v_finished := coalesce(v_finished, r.claimed_at); -- no invariant enabled
            v_until := v_finished;
        ELSE
            v_finished := coalesce(v_finished, r.next_claimed_at);
            v_until := r.next_claimed_at - interval '1 microsecond';
        END IF;
        v_rows := v_rows + 1;
        RETURN QUERY
            WITH seen AS (
                SELECT a.invariant, pg_catalog.count(*) AS n
                  FROM pgconsistency.anomaly a
                 WHERE a.first_seen_at BETWEEN r.claimed_at AND v_until
                 GROUP BY a.invariant
            ), per AS (
                SELECT i.name, coalesce(f.n, 0) AS n,
                       CASE WHEN s.last_started_at >= r.claimed_at
                                 AND (r.next_claimed_at IS NULL OR s.last_started_at < r.next_claimed_at)
                            THEN s.last_run_outcome
                            -- superseded, its run overwritten: it found anomalies, so it succeeded
                            WHEN f.n > 0 THEN 'succeeded' END AS outcome
                  FROM pgconsistency.invariant i
                  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
                  LEFT JOIN seen f ON f.invariant = i.name
                 WHERE i.enabled
            )
            SELECT r.id, r.reason, r.requests, r.claimed_at, v_finished, r.next_claimed_at IS NOT NULL,
                   d.id, d.marker, d.changed_at,
                   coalesce((SELECT pg_catalog.sum(p.n) FROM per p), 0)::bigint,
                   coalesce((SELECT pg_catalog.jsonb_object_agg(p.name,
                                        pg_catalog.jsonb_build_object('new_anomalies', p.n, 'outcome', p.outcome))
                               FROM per p), '{}'::jsonb),
                   coalesce((SELECT pg_catalog.array_agg(p.name ORDER BY p.name) FROM per p WHERE p.outcome IS NULL),
                            '{}'::text[]),
                   coalesce((SELECT pg_catalog.array_agg(p.name ORDER BY p.name) FROM per p
                              WHERE p.outcome IS DISTINCT FROM 'succeeded' OR p.n > 0), '{}'::text[])
              FROM (SELECT 1) one
              LEFT JOIN LATERAL (SELECT dd.id, dd.marker, dd.changed_at FROM pgconsistency.deployment dd
                                  WHERE dd.changed_at <= r.claimed_at
                                  ORDER BY dd.changed_at DESC, dd.id DESC LIMIT 1) d ON true;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._finished_requests(bigint, integer) IS
  'Internal: the claimed refresh requests after an id whose refresh finished, with the anomalies each found per invariant';

-- _requests_end: the id of the latest claimed request that has finished
-- (0: none): where a new consumer of finished_requests_for_log starts.
CREATE OR REPLACE FUNCTION pgconsistency._requests_end() RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((
        SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pgconsistency.invariant i
                                       LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
                                      WHERE i.enabled AND (s.last_started_at IS NULL OR s.last_started_at < q.claimed_at))
                    THEN q.id
                    ELSE (SELECT pg_catalog.max(p.id) FROM pgconsistency.refresh_request p
                           WHERE p.id < q.id AND p.claimed_at IS NOT NULL) END
          FROM pgconsistency.refresh_request q
         WHERE q.claimed_at IS NOT NULL
         ORDER BY q.id DESC LIMIT 1), 0)
$fn$;
COMMENT ON FUNCTION pgconsistency._requests_end() IS
  'Internal: the id of the latest claimed refresh request whose refresh finished (0: none)';

-- finished_requests_for_log: the refresh requests whose refresh finished
-- since a log consumer's request cursor (log_cursor.last_request_id),
-- oldest first, at most max_rows; see above for when a request has
-- finished. A consumer seen for the first time (or reading them for the
-- first time) starts at the current end: what finished before is not news
-- to it. advance_request_log_cursor() moves the cursor once the records
-- were delivered. The columns: the request, when it was claimed and when
-- its last run finished, whether a later request superseded it, the
-- deployment it followed (the latest with changed_at <= claimed_at, NULL if
-- none), the anomalies its runs found (total, and per enabled invariant,
-- 0 included, with the outcome of its run: NULL when not refreshed), the
-- invariants it did not refresh, and those not clean (new anomalies, a
-- failed or timed out run, or not refreshed).
CREATE OR REPLACE FUNCTION pgconsistency.finished_requests_for_log(consumer text, max_rows integer)
RETURNS TABLE (request_id bigint, reason text, requests integer, claimed_at timestamptz, finished_at timestamptz,
               superseded boolean, deployment_id bigint, deploy_marker text, deployed_at timestamptz,
               new_anomalies bigint, invariants jsonb, not_refreshed text[], not_clean text[])
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_seq  bigint := pgconsistency._log_cursor_owned(consumer);
    v_last bigint;
BEGIN
    IF v_seq IS NOT NULL THEN
        SELECT c.last_request_id INTO v_last
          FROM pgconsistency.log_cursor c WHERE c.consumer = finished_requests_for_log.consumer;
    END IF;
    IF v_last IS NULL THEN
        IF v_seq IS NULL THEN
            -- a new consumer: both cursors start at the current end
            INSERT INTO pgconsistency.log_cursor AS c (consumer, last_seq, updated_at, owner, last_request_id)
            VALUES (finished_requests_for_log.consumer, coalesce((SELECT pg_catalog.max(a.seq) FROM pgconsistency.anomaly a), 0),
                    pg_catalog.now(), session_user, pgconsistency._requests_end())
            ON CONFLICT ON CONSTRAINT log_cursor_pkey DO NOTHING;
        ELSE
            UPDATE pgconsistency.log_cursor c
               SET last_request_id = pgconsistency._requests_end(), updated_at = pg_catalog.now()
             WHERE c.consumer = finished_requests_for_log.consumer;
        END IF;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM pgconsistency._finished_requests(v_last, finished_requests_for_log.max_rows);
END
$fn$;
COMMENT ON FUNCTION pgconsistency.finished_requests_for_log(text, integer) IS
  'The refresh requests whose refresh finished after a log consumer''s request cursor, oldest first, with the new anomalies per invariant (0.6.0)';

-- advance_request_log_cursor: the consumer delivered the records of the
-- finished requests up to request_id.
CREATE OR REPLACE FUNCTION pgconsistency.advance_request_log_cursor(consumer text, request_id bigint) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pgconsistency._log_cursor_owned(consumer) IS NULL THEN
        RAISE EXCEPTION 'pgconsistency: consumer % has no log cursor', pg_catalog.quote_literal(consumer)
            USING HINT = 'finished_requests_for_log(consumer, max_rows) creates it.';
    END IF;
    UPDATE pgconsistency.log_cursor c
       SET last_request_id = GREATEST(c.last_request_id, advance_request_log_cursor.request_id), updated_at = pg_catalog.now()
     WHERE c.consumer = advance_request_log_cursor.consumer;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.advance_request_log_cursor(text, bigint) IS
  'Move a log consumer''s request cursor past the finished refresh requests it delivered (only the role that owns the cursor) (0.6.0)';
