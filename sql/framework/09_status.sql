-- pgconsistency framework: the status view.

-- status: one row per registered invariant; the one query the receiver runs
-- each scrape. It reads stored counts only (never the anomaly views), so its
-- cost does not depend on the size of the application tables.
--
-- Re-created only when its definition changed (_install_view). The grants on
-- the view (to pgconsistency_reader, see sql/roles.sql) are kept.
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
       s.refresh_duration_seconds,
       coalesce(s.consecutive_failures, 0)       AS consecutive_failures,
       s.last_status,
       s.last_started_at,
       s.last_finished_at,
       s.last_duration_seconds,
       s.last_error,
       s.last_skipped_at,
       coalesce(s.skips, 0)                      AS skips,
       -- what happened last, a skip included: never, succeeded, failed, timed_out or skipped
       CASE WHEN s.invariant IS NULL THEN 'never'
            WHEN s.last_skipped_at > s.last_finished_at THEN 'skipped'
            ELSE s.last_status END               AS last_outcome,
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
       s.last_healed_at
  FROM pgconsistency.invariant i
  LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
$def$;
BEGIN
    PERFORM pgconsistency._install_view('pgconsistency.status', v_def,
      'One row per registered invariant: latest snapshot counts and refresh outcome (cheap: reads stored state only)');
END
$do$;

