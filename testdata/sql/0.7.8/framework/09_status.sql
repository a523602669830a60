-- pgconsistency framework: the status view.

-- status: one row per registered invariant; the one query the receiver runs
-- each scrape. It reads stored counts only (never the anomaly views), so its
-- cost does not depend on the size of the application tables.
--
-- Re-created only when its definition changed (_install_view). The grants on
-- the view (to pgconsistency_reader, see sql/roles.sql) are kept.
--
-- The words: the *snapshot* is what the latest successful refresh found
-- (refreshed_at, snapshot_duration_seconds, the counts); a *run* is a refresh
-- that ran, whatever its outcome (last_run_outcome, last_started_at,
-- last_finished_at, last_duration_seconds, last_error); an *outcome* is
-- what a refresh came to (refresh_invariant() returns one; last_outcome is
-- the latest, a skip included).

-- _deprecated_column: value, after a NOTICE (once per session and column)
-- that old_name is deprecated in favour of new_name. The status view's
-- columns of their names before 0.4.0 go through it: a query that does not
-- read them does not call it (PostgreSQL drops a view's unread columns).
CREATE OR REPLACE FUNCTION pgconsistency._deprecated_column(old_name text, new_name text, value anyelement)
RETURNS anyelement
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.current_setting('pgconsistency.deprecated_' || old_name, true) IS DISTINCT FROM 'noticed' THEN
        PERFORM pg_catalog.set_config('pgconsistency.deprecated_' || old_name, 'noticed', false);
        RAISE NOTICE 'pgconsistency: pgconsistency.status.% is deprecated and will be removed in 0.8.0; read % instead', old_name, new_name;
    END IF;
    RETURN value;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._deprecated_column(text, text, anyelement) IS
  'Internal: a deprecated column of the status view: its value, and a NOTICE once per session naming the new column';

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
       s.snapshot_duration_seconds,
       coalesce(s.consecutive_failures, 0)       AS consecutive_failures,
       s.last_run_outcome,
       s.last_started_at,
       s.last_finished_at,
       s.last_duration_seconds,
       s.last_error,
       s.last_skipped_at,
       coalesce(s.skips, 0)                      AS skips,
       -- what happened last, a skip included: never, succeeded, failed, timed_out or skipped
       CASE WHEN s.invariant IS NULL THEN 'never'
            WHEN s.last_skipped_at > s.last_finished_at THEN 'skipped'
            ELSE s.last_run_outcome END          AS last_outcome,
       (SELECT count(*) FROM pgconsistency.refresh_request q WHERE q.claimed_at IS NULL) AS pending_requests,
       (SELECT d.changed_at FROM pgconsistency.deploy_marker d) AS deploy_marker_changed_at,
       -- the installed SQL version (0.2.0 and later), the same on every row
       pgconsistency.version()                   AS version,
       -- the refresh engine (0.3.0 and later)
       i.refresh_mode,
       s.last_refresh_kind,
       s.last_full_refresh_at,
       coalesce(s.rechecked_keys, 0)             AS rechecked_keys,
       coalesce(s.healed_anomalies, 0)           AS healed_anomalies,
       s.last_healed_at,
       -- the names of last_run_outcome and snapshot_duration_seconds before
       -- 0.4.0, until 0.8.0
       pgconsistency._deprecated_column('last_status', 'last_run_outcome', s.last_run_outcome) AS last_status,
       pgconsistency._deprecated_column('refresh_duration_seconds', 'snapshot_duration_seconds',
                                        s.snapshot_duration_seconds) AS refresh_duration_seconds,
       -- who answers for the invariant's alerts, and their runbook (0.5.0)
       i.owner,
       i.runbook_url,
       -- the deploy marker's value (0.6.0): the receiver puts it on its
       -- deploy-marker metric, which the new-anomalies alert names
       (SELECT d.value FROM pgconsistency.deploy_marker d) AS deploy_marker,
       -- where the latest refresh's new anomalies came from (0.6.0; NULL
       -- when it found none): the deployment they appeared after, whether
       -- it came after the previous clean refresh, how many have a recorded
       -- cause (audit pack) and the latest of those causes. The receiver
       -- makes the metrics the new-anomalies alert names them from.
       s.new_deploy_marker,
       s.new_deployed_at,
       s.new_deployed_since_previous_refresh,
       s.new_causes,
       s.new_cause_audit_id,
       s.new_cause_operation,
       s.new_cause_table,
       s.new_cause_txid,
       s.new_cause_changed_at,
       s.new_cause_db_user,
       s.new_cause_application_name,
       -- the capture (0.7.0): how the writes of an invariant in incremental
       -- mode are captured ('trigger' or 'wal'; NULL in full mode), the
       -- indexes its incremental refresh lacked; and, the same on every row,
       -- the WAL capture's slot: its state (pg_replication_slots.wal_status,
       -- or 'missing'), the WAL it keeps from removal, the WAL written since
       -- the capture's latest read, the bound (max_slot_wal_keep_size; NULL:
       -- none), the latest read, and why the slot was last created again.
       CASE WHEN i.refresh_mode = 'incremental' THEN cap.method END AS capture,
       s.incremental_index_hint,
       cap.slot_status                           AS capture_slot_status,
       cap.retained_bytes                        AS capture_wal_retained_bytes,
       cap.lag_bytes                             AS capture_wal_lag_bytes,
       cap.bound_bytes                           AS capture_wal_bound_bytes,
       cap.read_at                               AS capture_read_at,
       cap.slot_lost_reason                      AS capture_slot_lost_reason,
       cap.slot_lost_at                          AS capture_slot_lost_at
  FROM pgconsistency.invariant i
  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
  LEFT JOIN (
      SELECT m.method, m.read_at, m.slot_lost_reason, m.slot_lost_at,
             CASE WHEN m.method = 'wal' THEN coalesce(r.wal_status, 'missing') END AS slot_status,
             CASE WHEN m.method = 'wal' AND NOT pg_catalog.pg_is_in_recovery()
                  THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), r.restart_lsn)::bigint END AS retained_bytes,
             CASE WHEN m.method = 'wal' AND NOT pg_catalog.pg_is_in_recovery()
                  THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(),
                                                  GREATEST(m.wal_position, r.confirmed_flush_lsn))::bigint END AS lag_bytes,
             CASE WHEN m.method = 'wal' AND pg_catalog.current_setting('max_slot_wal_keep_size') <> '-1'
                  THEN pg_catalog.pg_size_bytes(pg_catalog.current_setting('max_slot_wal_keep_size')) END AS bound_bytes
        FROM pgconsistency.capture m
        LEFT JOIN pg_catalog.pg_replication_slots r ON r.slot_name = m.slot_name AND m.method = 'wal') cap ON true
$def$;
BEGIN
    PERFORM pgconsistency._install_view('pgconsistency.status', v_def,
      'One row per registered invariant: latest snapshot counts and refresh outcome (cheap: reads stored state only)');
END
$do$;
DO $do$
DECLARE
    c record;
BEGIN
    -- only when it differs: a COMMENT locks the relation
    FOR c IN SELECT v.col, v.comment
               FROM (VALUES ('last_run_outcome', 'Outcome of the latest refresh that ran: succeeded, failed or timed_out (NULL: never ran); called last_status before 0.4.0'),
                 ('snapshot_duration_seconds', 'Duration of the refresh that made the snapshot (the latest successful one); called refresh_duration_seconds before 0.4.0'),
                 ('last_outcome', 'What happened last, a skip included: never, succeeded, failed, timed_out or skipped'),
                 ('last_status', 'Deprecated (removed in 0.8.0): read last_run_outcome; reading it raises a NOTICE once per session'),
                 ('refresh_duration_seconds', 'Deprecated (removed in 0.8.0): read snapshot_duration_seconds; reading it raises a NOTICE once per session'),
                 ('owner', 'Who answers for the invariant''s alerts (Alertmanager routes on it); NULL: unset. pgconsistency.set_owner() changes it'),
                 ('runbook_url', 'The runbook the invariant''s anomaly alerts link to; NULL: unset (the generic runbook)')) AS v(col, comment)
              WHERE pg_catalog.col_description('pgconsistency.status'::regclass,
                        (SELECT a.attnum FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = 'pgconsistency.status'::regclass AND a.attname = v.col)) IS DISTINCT FROM v.comment
    LOOP
        EXECUTE pg_catalog.format('COMMENT ON COLUMN pgconsistency.status.%I IS %L', c.col, c.comment);
    END LOOP;
END
$do$;

-- anomaly_origin (0.6.0): the open anomalies with where they came from: the
-- deployment they appeared after, the refresh request that found them, and
-- the change that caused them when the audit pack recorded it. The query of
-- the runbook: SELECT * FROM pgconsistency.anomaly_origin WHERE new.
-- "new": first seen by the invariant's latest refresh (what the metric
-- pgconsistency.anomalies.new counts, acknowledged ones included). No
-- details: they copy application data (read pgconsistency.anomaly for them).
SELECT pgconsistency._install_view('pgconsistency.anomaly_origin', $v$
SELECT a.invariant, a.key, a.first_seen_at,
       (s.last_run_outcome = 'succeeded' AND a.first_seen_at = s.last_started_at) AS new,
       a.acknowledged_at IS NOT NULL AS acknowledged,
       a.deployment_id, d.marker AS deploy_marker, d.changed_at AS deployed_at, a.deployed_since_previous_refresh,
       a.refresh_reason,
       CASE WHEN a.deployment_id IS NULL THEN 'no deployment recorded'
            WHEN a.deployed_since_previous_refresh THEN
                 pg_catalog.format('after deployment %s (%s)', coalesce(d.marker, 'NULL'), d.changed_at)
            ELSE pg_catalog.format('no deployment since the last clean refresh (latest deployment: %s, %s)',
                                   coalesce(d.marker, 'NULL'), d.changed_at) END AS deploy,
       a.cause_audit_id, a.cause_operation, a.cause_table, a.cause_txid, a.cause_changed_at,
       a.cause_db_user, a.cause_application_name,
       CASE WHEN a.cause_audit_id IS NULL THEN 'no cause recorded'
            ELSE pg_catalog.format('%s on %s at %s by %s (application_name %s, txid %s, audit_log id %s)',
                                   a.cause_operation, a.cause_table, a.cause_changed_at, a.cause_db_user,
                                   coalesce(pg_catalog.quote_literal(a.cause_application_name), 'NULL'),
                                   a.cause_txid, a.cause_audit_id) END AS cause,
       CASE WHEN a.cause_operation = 'DELETE'
            THEN pg_catalog.format('SELECT pgconsistency.audit_restore(%s)', a.cause_audit_id) END AS restore
  FROM pgconsistency.anomaly a
  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = a.invariant
  LEFT JOIN pgconsistency.deployment d ON d.id = a.deployment_id
 WHERE a.resolved_at IS NULL
$v$, 'Open anomalies with the deployment they appeared after and the change that caused them (audit pack)');

-- deployment_summary (0.6.0): for each deployment seen and each invariant,
-- how many anomalies first appeared after it (before the next one), 0
-- included: "the deployment was clean" is a fact. Counts the anomalies still
-- kept: open ones and resolved ones within their invariant's
-- resolved_retention; an anomaly that resolved and came back counts for the
-- deployment it came back after.
SELECT pgconsistency._install_view('pgconsistency.deployment_summary', $v$
SELECT d.id AS deployment_id, d.marker AS deploy_marker, d.changed_at AS deployed_at, i.name AS invariant,
       coalesce(c.anomalies, 0) AS new_anomalies, coalesce(c.open, 0) AS open_anomalies
  FROM pgconsistency.deployment d
 CROSS JOIN pgconsistency.invariant i
  LEFT JOIN (SELECT a.deployment_id, a.invariant, pg_catalog.count(*) AS anomalies,
                    pg_catalog.count(*) FILTER (WHERE a.resolved_at IS NULL) AS open
               FROM pgconsistency.anomaly a WHERE a.deployment_id IS NOT NULL
              GROUP BY a.deployment_id, a.invariant) c ON c.deployment_id = d.id AND c.invariant = i.name
$v$, 'Per deployment seen and invariant: how many anomalies appeared after it (0 included)');
