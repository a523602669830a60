-- pgconsistency framework: the refresh of one invariant, refresh_invariant(),
-- and its steps. The loops that run it (refresh_plan, refresh_changes_plan,
-- CALL refresh()) are in 08_refresh_loop.sql.

-- _apply_refresh_settings: the settings a refresh runs with, for the rest of
-- the current transaction. One core per refresh (parallel workers made the
-- refreshes of make bench 2x slower on 2 cores and take CPU from the
-- application), then the invariant's own planner settings. No SET clause:
-- it would undo these settings when the function returns.
CREATE OR REPLACE FUNCTION pgconsistency._apply_refresh_settings(settings jsonb) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_catalog.set_config('max_parallel_workers_per_gather', '0', true);
    PERFORM pg_catalog.set_config(e.key, e.value, true) FROM pg_catalog.jsonb_each_text(settings - 'incremental') AS e;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._apply_refresh_settings(jsonb) IS
  'Internal: set the planner settings of a refresh (and of EXPLAINs of it) for the current transaction';

-- _refresh_due: whether an invariant whose latest refresh started at
-- last_started_at is due at "at": its refresh_period has passed, up to a
-- tenth of it (at most 30 s) early, so that a schedule whose tick equals
-- the period does not miss every other tick by a few milliseconds of jitter.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_due(last_started_at timestamptz, refresh_period interval, at timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT last_started_at IS NULL
        OR last_started_at <= at - refresh_period + least(interval '30 seconds', refresh_period / 10)
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_due(timestamptz, interval, timestamptz) IS
  'Internal: whether an invariant''s refresh_period has passed since its latest refresh started';


-- refresh_invariant refreshes one invariant in the current transaction, in
-- these steps, each a function below:
--   _refresh_lock      one refresh per invariant at a time: skip, not wait
--   _refresh_due       (above) whether its refresh_period has passed
--   _refresh_origin    where new anomalies come from: the previous refresh,
--                      the latest deployment, the refresh request's reason
--   _refresh_rows      the invariant's rows into pg_temp.pgconsistency_result:
--                      its query whole (full), for the pending keys only
--                      (incremental), or its registered materialized view
--   _refresh_lifecycle the rows against the open anomalies: writes what
--                      appeared (with its cause, from _anomaly_causes),
--                      resolved or changed
--   _refresh_reconciled a reconcile's end: clear its reason, report what it healed
--   _refresh_retention resolved anomalies past their retention go
--   _refresh_after     the invariant's after_refresh hook
--   _refresh_failure   a failure told apart: timed out, failed, or a cancel
--   _record_success / _record_failure  the outcome into refresh_state

-- _refresh_lock: take the invariant's refresh lock (transaction-scoped, so
-- it works behind transaction-pooling proxies), or, when another session
-- holds it, record the skip and return false: the running refresh produces
-- the same snapshot, so waiting for it would only queue schedulers.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_lock(invariant text, at timestamptz) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgconsistency'), pg_catalog.hashtext(invariant)) THEN
        RETURN true;
    END IF;
    RAISE NOTICE 'pgconsistency: refresh of % skipped: another session is refreshing it right now; its result will be the same', invariant;
    -- Only if the state row is free: never wait for the running refresh
    -- (it holds the row until it commits).
    UPDATE pgconsistency.refresh_state s
       SET last_skipped_at = at, skips = s.skips + 1
     WHERE s.invariant = (SELECT s2.invariant FROM pgconsistency.refresh_state s2
                           WHERE s2.invariant = _refresh_lock.invariant FOR UPDATE SKIP LOCKED);
    RETURN false;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_lock(text, timestamptz) IS
  'Internal: refresh step: take the invariant''s refresh lock, or record a skip and return false';

-- _refresh_origin: what a refresh starting at "at" needs to say where its
-- new anomalies come from (0.6.0): when the previous refresh saw the rows and
-- when the previous successful one started, the latest deployment, and the
-- reason of the latest refresh request claimed since the previous refresh
-- started (the request that led to this refresh).
CREATE OR REPLACE FUNCTION pgconsistency._refresh_origin(invariant text, at timestamptz,
    OUT prev_seen_at timestamptz, OUT prev_clean_started_at timestamptz,
    OUT deployment_id bigint, OUT deploy_marker text, OUT deployed_at timestamptz, OUT request_reason text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_prev_started timestamptz;
BEGIN
    SELECT s.refreshed_at, s.last_started_at, s.refreshed_at - pg_catalog.make_interval(secs => s.snapshot_duration_seconds)
      INTO prev_seen_at, v_prev_started, prev_clean_started_at
      FROM pgconsistency.refresh_state s WHERE s.invariant = _refresh_origin.invariant;
    SELECT d.id, d.marker, d.changed_at INTO deployment_id, deploy_marker, deployed_at
      FROM pgconsistency.deployment d ORDER BY d.id DESC LIMIT 1;
    SELECT r.reason INTO request_reason
      FROM pgconsistency.refresh_request r
     WHERE r.claimed_at > coalesce(v_prev_started, '-infinity') AND r.claimed_at <= at
     ORDER BY r.claimed_at DESC LIMIT 1;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_origin(text, timestamptz) IS
  'Internal: refresh step: the previous refresh, the latest deployment and the request reason a refresh records on its new anomalies';

-- _refresh_rows: the invariant's rows into pg_temp.pgconsistency_result (a
-- temporary table of the session: _work_table). Returns the kind of
-- refresh: 'full' (the query whole, with the invariant's planner settings:
-- the dataset pack's are merge joins over whole tables, so no plan depends
-- on how many rows an incident changed; or its registered materialized
-- view); in incremental mode 'incremental' (the query for the pending keys
-- only: the keys the plan moved here) or 'reconcile' (the query whole, when
-- something says the capture may have missed writes, or when more keys
-- changed than incremental_max_keys: reason says which). keys: the pending
-- keys taken; fresh_capture: the reconcile is the first of a capture (what
-- it finds was never the capture's to see: not counted as healed).
CREATE OR REPLACE FUNCTION pgconsistency._refresh_rows(inv pgconsistency.invariant,
    OUT kind text, OUT reason text, OUT keys text[], OUT fresh_capture boolean, OUT index_hint text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pgconsistency._work_table('pgconsistency_result', 'key text PRIMARY KEY, details jsonb');
    kind := 'full';
    fresh_capture := false;
    IF inv.query IS NULL THEN
        PERFORM pgconsistency._refresh_rows_registered(inv);
        RETURN;
    END IF;
    IF inv.refresh_mode = 'incremental' THEN
        reason := pgconsistency._reconcile_reason(inv.name);
        WITH taken AS (DELETE FROM pgconsistency.pending_key p WHERE p.invariant = inv.name RETURNING p.key)
        SELECT pg_catalog.array_agg(DISTINCT taken.key) INTO keys FROM taken;
        IF reason IS NULL AND pg_catalog.cardinality(keys) > inv.incremental_max_keys THEN
            reason := pg_catalog.format('%s keys changed, more than its incremental_max_keys (%s)',
                                        pg_catalog.cardinality(keys), inv.incremental_max_keys);
        END IF;
        kind := CASE WHEN reason IS NULL THEN 'incremental' ELSE 'reconcile' END;
        fresh_capture := reason IN (pgconsistency._reconcile_reason_started(), pgconsistency._reconcile_reason_changed());
    END IF;
    IF kind = 'incremental' THEN
        index_hint := pgconsistency._incremental_index_hint(inv.name);
        PERFORM pgconsistency._refresh_rows_incremental(inv, keys, index_hint IS NULL);
    ELSE
        PERFORM pgconsistency._apply_refresh_settings(inv.settings);
        EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                   SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q', inv.query);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_rows(pgconsistency.invariant) IS
  'Internal: refresh step: the invariant''s rows into pg_temp.pgconsistency_result, whole, incremental or from its view; returns the kind';

-- _refresh_rows_incremental: the rows of the pending keys only, by the
-- tables' indexes: the invariant's incremental settings
-- (settings->'incremental'; the dataset pack's force lookups by key: without
-- them PostgreSQL reads dataset_entries whole to join a few keys), not those
-- of its full refresh. Unless a table's key has no index (indexed false: a
-- schema that lost one): lookups by key would then read that table once per
-- key, so the server's own planner settings, which join the keys by hash.
-- No JIT either way (incremental settings may turn it on again): the query
-- reads the rows of a few keys, and compiling it cost more than that
-- (0.7.8: dataset_head_ref_mismatch, 900 keys at 1M datasets, spent 48 ms
-- of its 176 ms compiling; its planner's estimate passes jit_above_cost).
CREATE OR REPLACE FUNCTION pgconsistency._refresh_rows_incremental(inv pgconsistency.invariant, keys text[], indexed boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_catalog.set_config('jit', 'off', true);
    PERFORM pgconsistency._apply_refresh_settings(CASE WHEN indexed THEN coalesce(inv.settings -> 'incremental', '{}') ELSE '{}' END);
    IF coalesce(pg_catalog.cardinality(keys), 0) > 0 THEN
        EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                   SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q WHERE q.key = ANY ($1)', inv.query)
            USING keys;
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_rows_incremental(pgconsistency.invariant, text[], boolean) IS
  'Internal: refresh step: the rows of the pending keys only, by index lookups, or by hash where a key lost its index';

-- _refresh_rows_registered: the rows of a materialized view of
-- register_invariant(): REFRESH MATERIALIZED VIEW (CONCURRENTLY once
-- populated: reads go on), then a read of it.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_rows_registered(inv pgconsistency.invariant) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_populated boolean;
BEGIN
    PERFORM pgconsistency._apply_refresh_settings(inv.settings);
    SELECT c.relispopulated INTO v_populated
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = inv.view_schema AND c.relname = inv.view_name AND c.relkind = 'm';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'materialized view %.% does not exist', inv.view_schema, inv.view_name
            USING HINT = 'Re-create it and run register_invariant again, or unregister the invariant.';
    END IF;
    EXECUTE pg_catalog.format(CASE WHEN v_populated THEN 'REFRESH MATERIALIZED VIEW CONCURRENTLY %I.%I'
                                   ELSE 'REFRESH MATERIALIZED VIEW %I.%I' END, inv.view_schema, inv.view_name);
    EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result SELECT v.key, pg_catalog.to_jsonb(v) - ''key'' FROM %I.%I v',
                              inv.view_schema, inv.view_name);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_rows_registered(pgconsistency.invariant) IS
  'Internal: refresh step: the rows of a materialized view of register_invariant()';

-- _anomaly_causes: the change that caused each of the keys about to become
-- anomalies, one pgconsistency.anomaly_cause per key that has one: the one
-- interface between the refresh and a pack that records changes. The audit
-- pack (sql/audit.sql) provides pgconsistency.audit_causes with this
-- signature; without it, none (and looked is false: no cause looked for).
CREATE OR REPLACE FUNCTION pgconsistency._anomaly_causes(invariant text, keys text[], until timestamptz)
RETURNS SETOF pgconsistency.anomaly_cause
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pgconsistency._anomaly_causes_looked() AND pg_catalog.cardinality(keys) > 0 THEN
        RETURN QUERY EXECUTE 'SELECT * FROM pgconsistency.audit_causes($1, $2, $3)' USING invariant, keys, until;
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._anomaly_causes(text, text[], timestamptz) IS
  'Internal: the recorded change that caused each new anomaly''s key (from the audit pack''s audit_causes, if installed)';
CREATE OR REPLACE FUNCTION pgconsistency._anomaly_causes_looked() RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN pg_catalog.to_regprocedure('pgconsistency.audit_causes(text, text[], timestamptz)') IS NOT NULL;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._anomaly_causes_looked() IS
  'Internal: whether a pack that records the causes of anomalies (the audit pack) is installed';

-- _refresh_lifecycle: compare the rows with the invariant's open anomalies
-- and write only what changed, O(changes): an anomaly appears (new, or back
-- again, with its origin and cause), is resolved (open, but not in the
-- rows), or its details changed; nothing for one that persists. An
-- incremental refresh compares its keys only (keys not NULL). A reconcile
-- counts, as healed, what differed for keys that were not pending
-- (healed_keys): what the incremental refreshes missed.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_lifecycle(inv pgconsistency.invariant, at timestamptz, keys text[], healed_keys text[],
    origin record, OUT appeared bigint, OUT causes bigint, OUT resolved bigint, OUT healed bigint, OUT latest_cause pgconsistency.anomaly_cause)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_latest jsonb;
    v_key    text;
BEGIN
    -- New anomalies take their seqs (the order of the log records) under a
    -- lock held until this transaction commits: seqs then become visible in
    -- increasing order, so a log consumer that has read up to seq N never
    -- meets a smaller one later, whatever the refreshes running at the same
    -- time (nextval alone does not order commits). Concurrent refreshes
    -- queue here for this step only.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.anomaly_seq'), 0);
    -- This joins the rows with pgconsistency.anomaly, whose statistics a
    -- mass incident has just made wrong (100,000 anomalies inserted by the
    -- previous refresh, not analysed yet), as are the temporary table's
    -- (never analysed). So the server's planner settings, and no nested
    -- loop: hash or merge joins, linear whatever the statistics. No JIT: it
    -- took 0.6 s of a 3.4 s lifecycle (100,000 new anomalies), for nothing.
    -- (SET LOCAL ... TO DEFAULT: the value the session had before any SET,
    -- as pg_settings.reset_val, without building pg_settings' every row.)
    FOR v_key IN SELECT k FROM pg_catalog.jsonb_object_keys(inv.settings - 'incremental') AS k
                 UNION
                 SELECT k FROM pg_catalog.jsonb_object_keys(coalesce(inv.settings -> 'incremental', '{}')) AS k LOOP
        EXECUTE pg_catalog.format('SET LOCAL %I TO DEFAULT', v_key);
    END LOOP;
    PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);
    PERFORM pg_catalog.set_config('jit', 'off', true);
    EXECUTE $q$
        WITH o AS (
            SELECT a.key, a.details FROM pgconsistency.anomaly a
             WHERE a.invariant = $1 AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3))),
        d AS MATERIALIZED (
            SELECT coalesce(r.key, o.key) AS key, r.details, r.key IS NOT NULL AS present, o.key IS NOT NULL AS was_open
              FROM pg_temp.pgconsistency_result r FULL JOIN o ON o.key = r.key
             WHERE r.key IS NULL OR o.key IS NULL OR r.details IS DISTINCT FROM o.details),
        appeared AS (
            INSERT INTO pgconsistency.anomaly AS a (invariant, key, seq, first_seen_at, last_seen_at, details,
                                                    deployment_id, deployed_since_previous_refresh, refresh_reason,
                                                    cause_audit_id, cause_operation, cause_table, cause_txid,
                                                    cause_changed_at, cause_db_user, cause_application_name)
            SELECT $1, d.key, pg_catalog.nextval('pgconsistency.anomaly_seq'), $2, $2, d.details, $6, $7, $8,
                   (c).audit_id, (c).operation, (c).tbl, (c).txid, (c).changed_at, (c).db_user, (c).application_name
              FROM d
              LEFT JOIN pgconsistency._anomaly_causes($1, ARRAY(SELECT d2.key FROM d d2 WHERE d2.present AND NOT d2.was_open), $2) c
                ON c.key = d.key
             WHERE d.present AND NOT d.was_open
             ORDER BY d.key
            ON CONFLICT ON CONSTRAINT anomaly_pkey DO UPDATE
               SET seq = EXCLUDED.seq, first_seen_at = EXCLUDED.first_seen_at,
                   last_seen_at = EXCLUDED.last_seen_at, resolved_at = NULL, details = EXCLUDED.details,
                   acknowledged_at = NULL, acknowledged_by = NULL, acknowledged_reason = NULL, acknowledged_until = NULL,
                   deployment_id = EXCLUDED.deployment_id,
                   deployed_since_previous_refresh = EXCLUDED.deployed_since_previous_refresh,
                   refresh_reason = EXCLUDED.refresh_reason,
                   cause_audit_id = EXCLUDED.cause_audit_id, cause_operation = EXCLUDED.cause_operation,
                   cause_table = EXCLUDED.cause_table, cause_txid = EXCLUDED.cause_txid,
                   cause_changed_at = EXCLUDED.cause_changed_at, cause_db_user = EXCLUDED.cause_db_user,
                   cause_application_name = EXCLUDED.cause_application_name
            RETURNING a.key, a.cause_audit_id, a.cause_operation, a.cause_table, a.cause_txid, a.cause_changed_at,
                      a.cause_db_user, a.cause_application_name),
        resolved AS (
            UPDATE pgconsistency.anomaly a SET resolved_at = $2, last_seen_at = coalesce($4, a.last_seen_at)
              FROM d
             WHERE a.invariant = $1 AND a.key = d.key AND NOT d.present
               AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3))
            RETURNING 1),
        changed AS ( -- runs although nothing reads it, as every data-modifying WITH
            UPDATE pgconsistency.anomaly a SET details = d.details
              FROM d
             WHERE a.invariant = $1 AND a.key = d.key AND d.present AND d.was_open
               AND a.resolved_at IS NULL AND ($3::text[] IS NULL OR a.key = ANY ($3)))
        SELECT (SELECT count(*) FROM appeared), (SELECT count(appeared.cause_audit_id) FROM appeared),
               (SELECT count(*) FROM resolved),
               (SELECT count(*) FROM d
                 WHERE $5::text[] IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest($5::text[]) AS p(key) WHERE p.key = d.key)),
               -- the latest of the causes, for the status (a subquery: a
               -- lateral join would be a nested loop)
               (SELECT pg_catalog.to_jsonb(latest)
                  FROM (SELECT * FROM appeared WHERE appeared.cause_audit_id IS NOT NULL
                         ORDER BY appeared.cause_changed_at DESC, appeared.cause_audit_id DESC
                         LIMIT 1) latest)
    $q$
    INTO appeared, causes, resolved, healed, v_latest
    USING inv.name, at, keys, origin.prev_seen_at, healed_keys, origin.deployment_id,
          CASE WHEN origin.deployment_id IS NOT NULL
               THEN origin.deployed_at > coalesce(origin.prev_clean_started_at, '-infinity') END,
          origin.request_reason;
    latest_cause := (v_latest ->> 'key', (v_latest ->> 'cause_audit_id')::bigint, v_latest ->> 'cause_operation',
                     v_latest ->> 'cause_table', (v_latest ->> 'cause_txid')::bigint,
                     (v_latest ->> 'cause_changed_at')::timestamptz, v_latest ->> 'cause_db_user',
                     v_latest ->> 'cause_application_name');
    IF NOT pgconsistency._anomaly_causes_looked() THEN
        causes := NULL; -- no cause looked for
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_lifecycle(pgconsistency.invariant, timestamptz, text[], text[], record) IS
  'Internal: refresh step: write the anomalies that appeared (with origin and cause), resolved or changed; returns the counts';

-- _refresh_reconciled: at the end of a reconcile, its reason is cleared and
-- what it found that the incremental refreshes had missed is reported.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_reconciled(invariant text, reason text, healed bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    UPDATE pgconsistency.capture_state c SET reconcile_reason = NULL WHERE c.invariant = _refresh_reconciled.invariant;
    IF healed > 0 THEN
        RAISE WARNING 'pgconsistency: the reconcile of % found % anomalies (appeared, resolved or changed) that its incremental refreshes had missed, and corrected them',
            invariant, healed
            USING DETAIL = 'Reconciled because ' || reason || '.',
                  HINT = 'A write the capture did not see: a TRUNCATE, a disabled trigger, a lost replication slot, or a key mapping (define_invariant keys) that misses some rows.';
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_reconciled(text, text, bigint) IS
  'Internal: refresh step: clear a reconcile''s reason and report what it healed';

-- _refresh_retention: resolved anomalies older than resolved_retention go,
-- except those a log consumer has not read yet.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_retention(inv pgconsistency.invariant, at timestamptz) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    DELETE FROM pgconsistency.anomaly a
     WHERE a.invariant = inv.name
       AND a.resolved_at < at - inv.resolved_retention
       AND a.seq <= coalesce((SELECT pg_catalog.min(c.last_seq) FROM pgconsistency.log_cursor c), a.seq);
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_retention(pgconsistency.invariant, timestamptz) IS
  'Internal: refresh step: delete resolved anomalies past their retention that every log consumer has read';

-- _refresh_after: the invariant's after_refresh hook, a function of one text
-- argument (regprocedure: the name must resolve to exactly that).
CREATE OR REPLACE FUNCTION pgconsistency._refresh_after(inv pgconsistency.invariant) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF inv.after_refresh IS NOT NULL THEN
        EXECUTE pg_catalog.format('SELECT %s($1)', (inv.after_refresh || '(text)')::regprocedure::oid::regproc) USING inv.name;
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_after(pgconsistency.invariant) IS
  'Internal: refresh step: call the invariant''s after_refresh hook, if any';

-- _refresh_failure: what a refresh that raised came to: 'timed_out' (a
-- statement_timeout, or a lock_timeout: 55P03), or 'failed', with the error
-- to record and the hint that tells what to do; outcome NULL for a cancel
-- by a user or an administrator (pg_cancel_backend, Ctrl-C), which stops the
-- whole refresh. 57014 is a statement timeout or a cancel, not told apart
-- by the message, which follows lc_messages: a timeout is a cancel that came
-- once the statement_timeout armed for this statement had passed.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_failure(inv pgconsistency.invariant, state text, message text, hint text, detail text,
    OUT outcome text, OUT error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_timeout text := pg_catalog.current_setting('statement_timeout');
BEGIN
    outcome := 'failed';
    error := message;
    IF state = '57014' THEN
        IF v_timeout IN ('0', '') OR pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()
                                     < (CASE WHEN v_timeout ~ '^[0-9]+$' THEN v_timeout || 'ms' ELSE v_timeout END)::interval
                                       - interval '5 milliseconds' THEN
            outcome := NULL; -- a cancel
            RETURN;
        END IF;
        outcome := 'timed_out';
        error := pg_catalog.format('%s: the refresh ran longer than the statement_timeout in force (%s; the invariant''s statement_timeout is %s, in force under the receiver''s scheduler)',
                                   message, v_timeout, inv.statement_timeout);
        hint := pg_catalog.format('Raise it with UPDATE pgconsistency.invariant SET statement_timeout = ... WHERE name = %L, or make the query cheaper.', inv.name);
    ELSIF state = '55P03' THEN -- lock_not_available: lock_timeout
        outcome := 'timed_out';
        error := pg_catalog.format('%s: waited longer than the invariant''s lock_timeout (%s) for a lock held by another session',
                                   message, inv.lock_timeout);
        hint := 'A long transaction or DDL on the tables the invariant reads holds the lock; the next refresh tries again.';
    ELSIF state = '23505' AND message LIKE '%pgconsistency_result_pkey%' THEN -- unique_violation in the rows
        error := pg_catalog.format('its query returned the same key more than once (%s)', detail);
        hint := 'Each row of an invariant is one anomaly, about one entity: GROUP BY the key, or aggregate the details.';
    ELSIF state = '23502' AND message LIKE '%pgconsistency_result%' THEN -- not_null_violation in the rows
        error := 'its query returned a row whose key is NULL';
        hint := 'Select a NOT NULL key, or filter the rows without one.';
    END IF;
    IF coalesce(hint, '') <> '' THEN
        error := error || ' (hint: ' || hint || ')';
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_failure(pgconsistency.invariant, text, text, text, text) IS
  'Internal: refresh step: tell a failed refresh''s outcome (timed_out or failed) and error from a cancel (outcome NULL)';

-- _refresh_state_row: the refresh_state row of a successful refresh that
-- started at started, from what its steps returned: the counts (open
-- anomalies, acknowledged ones apart), the kind, what a reconcile healed,
-- where the new anomalies came from (nothing when there are none), the
-- latest recorded cause, and the indexes the incremental refresh lacked.
CREATE OR REPLACE FUNCTION pgconsistency._refresh_state_row(invariant text, started timestamptz, rows record, life record, origin record)
RETURNS pgconsistency.refresh_state
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r pgconsistency.refresh_state;
    v_finished timestamptz := pg_catalog.clock_timestamp();
BEGIN
    r.invariant := invariant;
    r.last_run_outcome := 'succeeded';
    r.last_started_at := started;
    r.last_finished_at := v_finished;
    r.last_duration_seconds := EXTRACT(epoch FROM v_finished - started)::double precision;
    r.refreshed_at := v_finished;
    r.snapshot_duration_seconds := r.last_duration_seconds;
    SELECT c.unacknowledged, c.acknowledged INTO r.anomalies, r.acknowledged_anomalies FROM pgconsistency._open_counts(invariant) c;
    r.new_anomalies := life.appeared;
    r.resolved_anomalies := life.resolved;
    r.consecutive_failures := 0;
    r.skips := 0;
    r.last_refresh_kind := rows.kind;
    r.last_full_refresh_at := CASE WHEN rows.kind <> 'incremental' THEN started END;
    r.rechecked_keys := CASE WHEN rows.kind = 'incremental' THEN coalesce(pg_catalog.cardinality(rows.keys), 0) ELSE 0 END;
    r.healed_anomalies := life.healed;
    r.last_healed_at := CASE WHEN life.healed > 0 THEN v_finished END;
    IF life.appeared > 0 THEN
        r.new_deployment_id := origin.deployment_id;
        r.new_deploy_marker := origin.deploy_marker;
        r.new_deployed_at := origin.deployed_at;
        r.new_deployed_since_previous_refresh := CASE WHEN origin.deployment_id IS NOT NULL
                                                      THEN origin.deployed_at > coalesce(origin.prev_clean_started_at, '-infinity') END;
        r.new_causes := life.causes;
    END IF;
    r.new_cause_audit_id := (life.latest_cause).audit_id;
    r.new_cause_operation := (life.latest_cause).operation;
    r.new_cause_table := (life.latest_cause).tbl;
    r.new_cause_txid := (life.latest_cause).txid;
    r.new_cause_changed_at := (life.latest_cause).changed_at;
    r.new_cause_db_user := (life.latest_cause).db_user;
    r.new_cause_application_name := (life.latest_cause).application_name;
    r.incremental_index_hint := rows.index_hint;
    RETURN r;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._refresh_state_row(text, timestamptz, record, record, record) IS
  'Internal: refresh step: the refresh_state row of a successful refresh, from what its steps returned';

-- _record_success: a successful refresh's outcome and snapshot into
-- refresh_state (r: the row as this refresh found it). Kept from before:
-- last_full_refresh_at after an incremental refresh, and what the latest
-- reconcile healed and the latest incremental refresh lacked until the next
-- of each.
CREATE OR REPLACE FUNCTION pgconsistency._record_success(r pgconsistency.refresh_state) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO pgconsistency.refresh_state AS s SELECT (r).*
    ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
       SET last_run_outcome = EXCLUDED.last_run_outcome, last_started_at = EXCLUDED.last_started_at,
           last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
           last_error = NULL, refreshed_at = EXCLUDED.refreshed_at,
           snapshot_duration_seconds = EXCLUDED.snapshot_duration_seconds,
           anomalies = EXCLUDED.anomalies, new_anomalies = EXCLUDED.new_anomalies,
           resolved_anomalies = EXCLUDED.resolved_anomalies,
           acknowledged_anomalies = EXCLUDED.acknowledged_anomalies, consecutive_failures = 0,
           last_refresh_kind = EXCLUDED.last_refresh_kind,
           last_full_refresh_at = coalesce(EXCLUDED.last_full_refresh_at, s.last_full_refresh_at),
           rechecked_keys = EXCLUDED.rechecked_keys,
           healed_anomalies = CASE WHEN EXCLUDED.last_refresh_kind = 'incremental' THEN s.healed_anomalies
                                   ELSE EXCLUDED.healed_anomalies END,
           last_healed_at = coalesce(EXCLUDED.last_healed_at, s.last_healed_at),
           new_deployment_id = EXCLUDED.new_deployment_id, new_deploy_marker = EXCLUDED.new_deploy_marker,
           new_deployed_at = EXCLUDED.new_deployed_at,
           new_deployed_since_previous_refresh = EXCLUDED.new_deployed_since_previous_refresh,
           new_causes = EXCLUDED.new_causes, new_cause_audit_id = EXCLUDED.new_cause_audit_id,
           new_cause_operation = EXCLUDED.new_cause_operation, new_cause_table = EXCLUDED.new_cause_table,
           new_cause_txid = EXCLUDED.new_cause_txid, new_cause_changed_at = EXCLUDED.new_cause_changed_at,
           new_cause_db_user = EXCLUDED.new_cause_db_user,
           new_cause_application_name = EXCLUDED.new_cause_application_name,
           incremental_index_hint = CASE WHEN EXCLUDED.last_refresh_kind = 'incremental' THEN EXCLUDED.incremental_index_hint
                                         ELSE s.incremental_index_hint END;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._record_success(pgconsistency.refresh_state) IS
  'Internal: refresh step: record a successful refresh and its snapshot in refresh_state';

-- _record_failure: a failed or timed-out refresh into refresh_state. The
-- snapshot (refreshed_at, the counts) is left as it was: it is still the
-- latest good one, and its age shows that it is getting stale.
CREATE OR REPLACE FUNCTION pgconsistency._record_failure(invariant text, outcome text, started timestamptz, finished timestamptz, error text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE WARNING 'pgconsistency: refresh of % %: %', invariant, pg_catalog.replace(outcome, '_', ' '), error;
    INSERT INTO pgconsistency.refresh_state AS s
           (invariant, last_run_outcome, last_started_at, last_finished_at, last_duration_seconds, last_error, consecutive_failures)
    VALUES (invariant, outcome, started, finished, EXTRACT(epoch FROM finished - started)::double precision, error, 1)
    ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
       SET last_run_outcome = EXCLUDED.last_run_outcome, last_started_at = EXCLUDED.last_started_at,
           last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
           last_error = EXCLUDED.last_error, consecutive_failures = s.consecutive_failures + 1;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._record_failure(text, text, timestamptz, timestamptz, text) IS
  'Internal: refresh step: record a failed or timed-out refresh in refresh_state; the snapshot stays';

-- refresh_invariant: refresh one invariant in the current transaction: the
-- second step of a refresh loop (its plan first: refresh_plan or
-- refresh_changes_plan, which also move the captured keys to the
-- invariants), which the receiver's scheduler runs as a statement of its
-- own. By hand, CALL pgconsistency.refresh() instead: it commits after each
-- invariant. With force false, an invariant whose refresh_period has not
-- passed since its previous refresh started is left alone. Returns the
-- outcome: 'succeeded', 'failed', 'timed_out', 'skipped' (another session
-- holds the invariant) or 'not_due'. Its steps are the functions above.
CREATE OR REPLACE FUNCTION pgconsistency.refresh_invariant(invariant text, force boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    inv       pgconsistency.invariant%ROWTYPE;
    v_started timestamptz := pg_catalog.clock_timestamp();
    v_origin  record;
    v_rows    record;
    v_life    record;
    v_state   pgconsistency.refresh_state%ROWTYPE;
    v_failure record;
    v_sqlstate text;
    v_message text;
    v_hint    text;
    v_detail  text;
BEGIN
    SELECT * INTO inv FROM pgconsistency.invariant i WHERE i.name = refresh_invariant.invariant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;
    IF NOT pgconsistency._refresh_lock(inv.name, v_started) THEN
        RETURN 'skipped';
    END IF;
    -- Due? Checked under the lock, on committed state, so two schedulers
    -- never refresh the same invariant twice in one period.
    IF NOT force AND NOT pgconsistency._refresh_due(
        (SELECT s.last_started_at FROM pgconsistency.refresh_state s WHERE s.invariant = inv.name), inv.refresh_period, v_started) THEN
        RETURN 'not_due';
    END IF;
    SELECT * INTO v_origin FROM pgconsistency._refresh_origin(inv.name, v_started);
    -- Bounded waits: a refresh must never queue writers behind it. It takes
    -- ACCESS SHARE on the tables it reads (and REFRESH CONCURRENTLY an
    -- EXCLUSIVE lock on a registered view: reads go on).
    PERFORM pg_catalog.set_config('lock_timeout', (EXTRACT(epoch FROM inv.lock_timeout) * 1000)::bigint::text, true);
    BEGIN
        SELECT * INTO v_rows FROM pgconsistency._refresh_rows(inv);
        IF v_rows.kind = 'incremental' AND coalesce(pg_catalog.cardinality(v_rows.keys), 0) = 0 THEN
            -- Nothing was written to its tables: nothing to compare.
            -- (the types of _refresh_lifecycle's OUT parameters, exactly:
            -- _refresh_state_row's plan is made for them)
            SELECT 0::bigint AS appeared, NULL::bigint AS causes, 0::bigint AS resolved, 0::bigint AS healed,
                   NULL::pgconsistency.anomaly_cause AS latest_cause
              INTO v_life;
        ELSE
            SELECT * INTO v_life FROM pgconsistency._refresh_lifecycle(inv, v_started,
                CASE WHEN v_rows.kind = 'incremental' THEN coalesce(v_rows.keys, '{}') END,
                CASE WHEN v_rows.kind = 'reconcile' AND NOT v_rows.fresh_capture THEN coalesce(v_rows.keys, '{}') END,
                v_origin);
        END IF;
        IF v_rows.kind = 'reconcile' THEN
            PERFORM pgconsistency._refresh_reconciled(inv.name, v_rows.reason, v_life.healed);
        END IF;
        PERFORM pgconsistency._refresh_retention(inv, v_started);
        PERFORM pgconsistency._refresh_after(inv);
    EXCEPTION
        WHEN query_canceled OR others THEN
            GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT, v_sqlstate = RETURNED_SQLSTATE,
                                    v_detail = PG_EXCEPTION_DETAIL;
            SELECT * INTO v_failure FROM pgconsistency._refresh_failure(inv, v_sqlstate, v_message, v_hint, v_detail);
            IF v_failure.outcome IS NULL THEN
                RAISE; -- a cancel by a user or an administrator stops the whole refresh
            END IF;
            PERFORM pgconsistency._record_failure(inv.name, v_failure.outcome, v_started, pg_catalog.clock_timestamp(), v_failure.error);
            RETURN v_failure.outcome;
    END;
    v_state := pgconsistency._refresh_state_row(inv.name, v_started, v_rows, v_life, v_origin);
    PERFORM pgconsistency._record_success(v_state);
    RETURN 'succeeded';
END
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_invariant(text, boolean) IS
  'Refresh one invariant in the current transaction: a step of the refresh loop of schedulers; by hand, use CALL pgconsistency.refresh() instead';
