-- pgconsistency framework: the refresh. One refresh loop: refresh_plan()
-- says what is due (and runs due requests, expires acknowledgements), then
-- refresh_invariant() refreshes each invariant in a transaction of its own.
-- CALL pgconsistency.refresh() runs that loop; pg_cron and the receiver's
-- scheduler run it too, the scheduler one statement at a time.

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

-- refresh_invariant: refresh one invariant in the current transaction: the
-- second step of the refresh loop (refresh_plan first), which the receiver's
-- scheduler runs as a statement of its own. By hand, CALL
-- pgconsistency.refresh() instead: it commits after each invariant.
-- With force false, an invariant whose refresh_period has not passed since
-- its previous refresh started is left alone. Returns the outcome:
-- 'succeeded', 'failed', 'timed_out', 'skipped' (another session holds the
-- invariant) or 'not_due'.
--
-- A refresh has two steps. The first computes the invariant's rows into a
-- temporary table: its query, whole (a full refresh) or for the pending
-- keys only (incremental), or, for a view of register_invariant(), a
-- REFRESH MATERIALIZED VIEW and a read of it. The second, the lifecycle,
-- compares those rows with the open anomalies and writes only what changed.
CREATE OR REPLACE FUNCTION pgconsistency.refresh_invariant(invariant text, force boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    inv        pgconsistency.invariant%ROWTYPE;
    v_started  timestamptz := pg_catalog.clock_timestamp();
    v_finished timestamptz;
    v_populated boolean;
    v_total    bigint;
    v_new      bigint;
    v_resolved bigint;
    v_acked    bigint;
    v_healed   bigint := 0;
    v_kind     text := 'full';
    v_reason   text;
    v_keys     text[];
    v_rechecked bigint := 0;
    v_fresh_capture boolean := false;
    v_prev_seen timestamptz;
    v_prev_started timestamptz;
    v_prev_clean_started timestamptz;
    v_deployment pgconsistency.deployment%ROWTYPE;
    v_causes   bigint; -- NULL: no cause looked for (no audit pack)
    v_cause    pgconsistency.anomaly%ROWTYPE;
    v_latest_cause jsonb;
    v_cause_join text;
    v_audited  boolean := false; -- the audit pack is installed
    v_request_reason text;
    v_index_hint text; -- the indexes the incremental refresh lacked
    v_status   text := 'succeeded';
    v_error    text;
    v_hint     text;
    v_detail   text;
    v_state    text;
    v_timeout  text;
BEGIN
    SELECT * INTO inv FROM pgconsistency.invariant i WHERE i.name = refresh_invariant.invariant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconsistency: unknown invariant %', pg_catalog.quote_literal(invariant)
            USING HINT = 'SELECT name FROM pgconsistency.invariant lists the registered invariants.';
    END IF;

    -- One refresh per invariant at a time, across sessions and collectors.
    -- Transaction-scoped, so it also works behind transaction-pooling proxies.
    -- Skip rather than wait: the running refresh produces the same snapshot.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('pgconsistency'), pg_catalog.hashtext(inv.name)) THEN
        RAISE NOTICE 'pgconsistency: refresh of % skipped: another session is refreshing it right now; its result will be the same', inv.name;
        -- Record the skip only if the state row is free: never wait for the
        -- running refresh (it holds the row until it commits).
        UPDATE pgconsistency.refresh_state s
           SET last_skipped_at = v_started, skips = s.skips + 1
         WHERE s.invariant = (SELECT s2.invariant FROM pgconsistency.refresh_state s2
                               WHERE s2.invariant = inv.name FOR UPDATE SKIP LOCKED);
        RETURN 'skipped';
    END IF;

    -- Due? Checked under the lock, on committed state, so two schedulers
    -- never refresh the same invariant twice in one period.
    IF NOT force AND NOT pgconsistency._refresh_due(
        (SELECT s.last_started_at FROM pgconsistency.refresh_state s WHERE s.invariant = inv.name),
        inv.refresh_period, v_started) THEN
        RETURN 'not_due';
    END IF;
    SELECT s.refreshed_at, s.last_started_at,
           s.refreshed_at - pg_catalog.make_interval(secs => s.snapshot_duration_seconds)
      INTO v_prev_seen, v_prev_started, v_prev_clean_started
      FROM pgconsistency.refresh_state s WHERE s.invariant = inv.name;
    -- Where new anomalies come from (0.6.0): the latest deployment (whether
    -- it came after the previous successful refresh started: the previous
    -- snapshot may not have seen it), and the reason of the latest refresh
    -- request claimed since this invariant's previous refresh started (the
    -- request that led to this refresh, by CALL refresh() or a scheduler
    -- alike).
    SELECT d.* INTO v_deployment FROM pgconsistency.deployment d ORDER BY d.id DESC LIMIT 1;
    SELECT r.reason INTO v_request_reason
      FROM pgconsistency.refresh_request r
     WHERE r.claimed_at > coalesce(v_prev_started, '-infinity') AND r.claimed_at <= v_started
     ORDER BY r.claimed_at DESC LIMIT 1;

    -- Bounded waits: a refresh must never queue writers behind it. It takes
    -- ACCESS SHARE on the tables it reads (and REFRESH CONCURRENTLY an
    -- EXCLUSIVE lock on a registered view: reads go on).
    PERFORM pg_catalog.set_config('lock_timeout', (EXTRACT(epoch FROM inv.lock_timeout) * 1000)::bigint::text, true);

    BEGIN
        -- The rows of this refresh: a temporary table of the session, made
        -- once (not per refresh: that would write the catalog each time),
        -- emptied at every commit.
        IF pg_catalog.to_regclass('pg_temp.pgconsistency_result') IS NULL THEN
            CREATE TEMPORARY TABLE pgconsistency_result (key text PRIMARY KEY, details jsonb) ON COMMIT DELETE ROWS;
        ELSE
            DELETE FROM pg_temp.pgconsistency_result; -- empty, unless an earlier refresh of this transaction used it
        END IF;

        IF inv.query IS NULL THEN
            -- A materialized view of register_invariant().
            PERFORM pgconsistency._apply_refresh_settings(inv.settings);
            SELECT c.relispopulated INTO v_populated
              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = inv.view_schema AND c.relname = inv.view_name AND c.relkind = 'm';
            IF NOT FOUND THEN
                RAISE EXCEPTION 'materialized view %.% does not exist', inv.view_schema, inv.view_name
                    USING HINT = 'Re-create it and run register_invariant again, or unregister the invariant.';
            END IF;
            -- CONCURRENTLY needs a populated view; the first refresh populates it.
            EXECUTE pg_catalog.format(CASE WHEN v_populated THEN 'REFRESH MATERIALIZED VIEW CONCURRENTLY %I.%I'
                                           ELSE 'REFRESH MATERIALIZED VIEW %I.%I' END, inv.view_schema, inv.view_name);
            EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result SELECT v.key, pg_catalog.to_jsonb(v) - ''key'' FROM %I.%I v',
                                      inv.view_schema, inv.view_name);
        ELSE
            IF inv.refresh_mode = 'incremental' THEN
                -- The keys captured until the refresh plan (which moved
                -- them here: refresh_plan, refresh_changes_plan); a full
                -- refresh (a reconcile) when something says the capture
                -- may have missed writes, or when too many keys changed.
                v_reason := pgconsistency._reconcile_reason(inv.name);
                WITH taken AS (DELETE FROM pgconsistency.pending_key p WHERE p.invariant = inv.name RETURNING p.key)
                SELECT pg_catalog.array_agg(DISTINCT taken.key) INTO v_keys FROM taken;
                IF v_reason IS NULL AND pg_catalog.cardinality(v_keys) > inv.incremental_max_keys THEN
                    v_reason := pg_catalog.format('%s keys changed, more than its incremental_max_keys (%s)',
                                                  pg_catalog.cardinality(v_keys), inv.incremental_max_keys);
                END IF;
                v_kind := CASE WHEN v_reason IS NULL THEN 'incremental' ELSE 'reconcile' END;
                -- What the first reconcile after a switch to incremental
                -- mode (or after a changed query or key mapping) finds was
                -- never the capture's to see: not counted as healed.
                v_fresh_capture := v_reason IN (pgconsistency._reconcile_reason_started(), pgconsistency._reconcile_reason_changed());
            END IF;
            IF v_kind = 'incremental' THEN
                -- Only the pending keys, by the tables' indexes: the
                -- invariant's incremental settings (settings->'incremental';
                -- the dataset pack's force lookups by key: without them
                -- PostgreSQL reads dataset_entries whole to join a few
                -- keys), not those of its full refresh. Unless a table's key
                -- has no index (a schema that lost one): lookups by key would
                -- then read that table once per key, so the server's own
                -- planner settings, which join the keys by hash (one read).
                v_index_hint := pgconsistency._incremental_index_hint(inv.name);
                PERFORM pgconsistency._apply_refresh_settings(CASE WHEN v_index_hint IS NULL
                                                                   THEN coalesce(inv.settings -> 'incremental', '{}') ELSE '{}' END);
                v_rechecked := coalesce(pg_catalog.cardinality(v_keys), 0);
                IF v_rechecked > 0 THEN
                    EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                               SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q WHERE q.key = ANY ($1)', inv.query)
                        USING v_keys;
                END IF;
            ELSE
                -- The whole query, with the invariant's planner settings
                -- (the dataset pack's are merge joins over whole tables: no
                -- plan of theirs depends on how many rows an incident
                -- changed). The refresh writes nothing the query reads.
                PERFORM pgconsistency._apply_refresh_settings(inv.settings);
                EXECUTE pg_catalog.format('INSERT INTO pg_temp.pgconsistency_result
                                           SELECT q.key, pg_catalog.to_jsonb(q) - ''key'' FROM (%s) q', inv.query);
            END IF;
        END IF;

        IF v_kind = 'incremental' AND v_rechecked = 0 THEN
            -- Nothing was written to its tables: nothing to compare.
            v_new := 0; v_resolved := 0;
        ELSE
            -- New anomalies take their seqs (the order of the log records) under
            -- a lock held until this transaction commits: seqs then become
            -- visible in increasing order, so a log consumer that has read up to
            -- seq N never meets a smaller one later, whatever the refreshes
            -- running at the same time (nextval alone does not order commits).
            -- Concurrent refreshes queue here for the lifecycle step only.
            PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgconsistency.anomaly_seq'), 0);

            -- The change that caused each new anomaly, where the audit pack
            -- (sql/audit.sql, optional) records a table the invariant reads:
            -- its join gives c.* for each appearing row, written with it.
            -- Without it, c.* are NULL. (Before the planner settings below:
            -- the catalog queries behind it plan badly without nested loops.)
            IF pg_catalog.to_regprocedure('pgconsistency._anomaly_cause_join(text)') IS NOT NULL THEN
                EXECUTE 'SELECT pgconsistency._anomaly_cause_join($1)' INTO v_cause_join USING inv.name;
                v_audited := true;
            END IF;

            -- The lifecycle joins the rows with pgconsistency.anomaly, whose
            -- statistics a mass incident has just made wrong (100,000 anomalies
            -- inserted by the previous refresh, not analysed yet), as are the
            -- temporary table's (never analysed). So the server's planner
            -- settings, and no nested loop: hash or merge joins, linear
            -- whatever the statistics.
            PERFORM pg_catalog.set_config(e.key, s.reset_val, true)
               FROM (SELECT k FROM pg_catalog.jsonb_object_keys(inv.settings - 'incremental') AS k
                     UNION
                     SELECT k FROM pg_catalog.jsonb_object_keys(coalesce(inv.settings -> 'incremental', '{}')) AS k) AS e(key)
               JOIN pg_catalog.pg_settings s ON s.name = e.key;
            PERFORM pg_catalog.set_config('enable_nestloop', 'off', true);
            -- No JIT: the nested loop the cause join needs costs 1e10 once
            -- nested loops are off, far above jit_above_cost, and compiling
            -- the statement then took 0.6 s of a 3.4 s lifecycle (100,000
            -- new anomalies), for nothing.
            PERFORM pg_catalog.set_config('jit', 'off', true);

            -- O(changes) writes: an anomaly appears (new, or back again), is
            -- resolved (open, but not in the rows), or its details changed.
            -- Nothing for one that persists. An incremental refresh compares
            -- its keys only ($3). A reconcile counts what differed for keys
            -- that were not pending ($5): what the incremental refreshes missed.
            EXECUTE pg_catalog.replace($q$
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
                    SELECT $1, d.key, pg_catalog.nextval('pgconsistency.anomaly_seq'), $2, $2, d.details,
                           $6, $7, $8,
                           c.id, c.operation, c.tbl, c.txid, c.changed_at, c.db_user, c.application_name
                      FROM d /*cause join*/
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
                    RETURNING a.cause_audit_id, a.cause_operation, a.cause_table, a.cause_txid, a.cause_changed_at,
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
                       -- the latest of the causes, for the status (a subquery:
                       -- a lateral join would be a nested loop)
                       (SELECT pg_catalog.to_jsonb(latest)
                          FROM (SELECT * FROM appeared WHERE appeared.cause_audit_id IS NOT NULL
                                 ORDER BY appeared.cause_changed_at DESC, appeared.cause_audit_id DESC
                                 LIMIT 1) latest)
            $q$, '/*cause join*/', coalesce(v_cause_join, $j$LEFT JOIN LATERAL (
                SELECT NULL::bigint AS id, NULL::text AS operation, NULL::text AS tbl, NULL::bigint AS txid,
                       NULL::timestamptz AS changed_at, NULL::text AS db_user, NULL::text AS application_name) c ON true$j$))
            INTO v_new, v_causes, v_resolved, v_healed, v_latest_cause
            USING inv.name, v_started, CASE WHEN v_kind = 'incremental' THEN coalesce(v_keys, '{}') END, v_prev_seen,
                  CASE WHEN v_kind = 'reconcile' AND NOT v_fresh_capture THEN coalesce(v_keys, '{}') END,
                  v_deployment.id,
                  CASE WHEN v_deployment.id IS NOT NULL
                       THEN v_deployment.changed_at > coalesce(v_prev_clean_started, '-infinity') END,
                  v_request_reason;
            IF NOT v_audited THEN
                v_causes := NULL; -- no cause looked for
            END IF;
            v_cause := pg_catalog.jsonb_populate_record(NULL::pgconsistency.anomaly, v_latest_cause);
        END IF;
        SELECT c.unacknowledged, c.acknowledged INTO v_total, v_acked FROM pgconsistency._open_counts(inv.name) c;
        IF v_kind = 'reconcile' THEN
            UPDATE pgconsistency.capture_state c SET reconcile_reason = NULL WHERE c.invariant = inv.name;
            IF v_healed > 0 THEN
                RAISE WARNING 'pgconsistency: the reconcile of % found % anomalies (appeared, resolved or changed) that its incremental refreshes had missed, and corrected them',
                    inv.name, v_healed
                    USING DETAIL = 'Reconciled because ' || v_reason || '.',
                          HINT = 'A write the capture did not see: a TRUNCATE, a disabled trigger, or a key mapping (define_invariant keys) that misses some rows.';
            END IF;
        END IF;
        -- Retention: resolved anomalies older than resolved_retention go,
        -- except those a log consumer has not read yet.
        DELETE FROM pgconsistency.anomaly a
         WHERE a.invariant = inv.name
           AND a.resolved_at < v_started - inv.resolved_retention
           AND a.seq <= coalesce((SELECT min(c.last_seq) FROM pgconsistency.log_cursor c), a.seq);
        IF inv.after_refresh IS NOT NULL THEN
            -- regprocedure: the name must resolve to a function of one text argument.
            EXECUTE pg_catalog.format('SELECT %s($1)', (inv.after_refresh || '(text)')::regprocedure::oid::regproc)
                USING inv.name;
        END IF;
    EXCEPTION
        WHEN query_canceled THEN
            -- 57014 is a statement timeout or a cancel (pg_cancel_backend,
            -- Ctrl-C). Not told apart by the message, which follows
            -- lc_messages: a timeout is a cancel that came once the
            -- statement_timeout armed for this statement had passed.
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
            v_timeout := pg_catalog.current_setting('statement_timeout');
            IF v_timeout IN ('0', '') OR pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()
                                         < (CASE WHEN v_timeout ~ '^[0-9]+$' THEN v_timeout || 'ms' ELSE v_timeout END)::interval
                                           - interval '5 milliseconds' THEN
                RAISE; -- a cancel by the user or an administrator stops the whole refresh
            END IF;
            v_status := 'timed_out';
            v_error := pg_catalog.format('%s: the refresh ran longer than the statement_timeout in force (%s; the invariant''s statement_timeout is %s, in force under the receiver''s scheduler)',
                                         v_error, v_timeout, inv.statement_timeout);
            v_hint := pg_catalog.format('Raise it with UPDATE pgconsistency.invariant SET statement_timeout = ... WHERE name = %L, or make the query cheaper.', inv.name);
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_hint = PG_EXCEPTION_HINT, v_state = RETURNED_SQLSTATE,
                                    v_detail = PG_EXCEPTION_DETAIL;
            IF v_state = '55P03' THEN -- lock_not_available: lock_timeout
                v_status := 'timed_out';
                v_error := pg_catalog.format('%s: waited longer than the invariant''s lock_timeout (%s) for a lock held by another session',
                                             v_error, inv.lock_timeout);
                v_hint := 'A long transaction or DDL on the tables the invariant reads holds the lock; the next refresh tries again.';
            ELSIF v_state = '23505' AND v_error LIKE '%pgconsistency_result_pkey%' THEN -- unique_violation in the rows
                v_status := 'failed';
                v_error := pg_catalog.format('its query returned the same key more than once (%s)', v_detail);
                v_hint := 'Each row of an invariant is one offending entity: GROUP BY the key, or aggregate the details.';
            ELSIF v_state = '23502' AND v_error LIKE '%pgconsistency_result%' THEN -- not_null_violation in the rows
                v_status := 'failed';
                v_error := 'its query returned a row whose key is NULL';
                v_hint := 'Select a NOT NULL key, or filter the rows without one.';
            ELSE
                v_status := 'failed';
            END IF;
    END;
    IF coalesce(v_hint, '') <> '' THEN
        v_error := v_error || ' (hint: ' || v_hint || ')';
    END IF;

    v_finished := pg_catalog.clock_timestamp();

    IF v_status = 'succeeded' THEN
        INSERT INTO pgconsistency.refresh_state AS s
               (invariant, last_run_outcome, last_started_at, last_finished_at, last_duration_seconds, last_error,
                refreshed_at, snapshot_duration_seconds, anomalies, new_anomalies, resolved_anomalies,
                acknowledged_anomalies, consecutive_failures, last_refresh_kind, last_full_refresh_at,
                rechecked_keys, healed_anomalies, last_healed_at,
                new_deployment_id, new_deploy_marker, new_deployed_at, new_deployed_since_previous_refresh,
                new_causes, new_cause_audit_id, new_cause_operation, new_cause_table, new_cause_txid,
                new_cause_changed_at, new_cause_db_user, new_cause_application_name, incremental_index_hint)
        VALUES (inv.name, 'succeeded', v_started, v_finished,
                EXTRACT(epoch FROM v_finished - v_started)::double precision, NULL,
                v_finished, EXTRACT(epoch FROM v_finished - v_started)::double precision,
                v_total, v_new, v_resolved, v_acked, 0, v_kind,
                CASE WHEN v_kind <> 'incremental' THEN v_started END, v_rechecked, v_healed,
                CASE WHEN v_healed > 0 THEN v_finished END,
                -- where the new anomalies came from: nothing when there are none
                CASE WHEN v_new > 0 THEN v_deployment.id END, CASE WHEN v_new > 0 THEN v_deployment.marker END,
                CASE WHEN v_new > 0 THEN v_deployment.changed_at END,
                CASE WHEN v_new > 0 AND v_deployment.id IS NOT NULL
                     THEN v_deployment.changed_at > coalesce(v_prev_clean_started, '-infinity') END,
                CASE WHEN v_new > 0 THEN v_causes END, v_cause.cause_audit_id, v_cause.cause_operation,
                v_cause.cause_table, v_cause.cause_txid, v_cause.cause_changed_at, v_cause.cause_db_user,
                v_cause.cause_application_name, v_index_hint)
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
               -- what the latest reconcile healed stays until the next one
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
               -- what the latest incremental refresh lacked stays until the next one
               incremental_index_hint = CASE WHEN EXCLUDED.last_refresh_kind = 'incremental' THEN EXCLUDED.incremental_index_hint
                                             ELSE s.incremental_index_hint END;
        RETURN 'succeeded';
    END IF;

    -- The snapshot (refreshed_at, anomalies) is left as it was: it is still the
    -- latest good one, and its age shows that it is getting stale.
    RAISE WARNING 'pgconsistency: refresh of % %: %', inv.name, replace(v_status, '_', ' '), v_error;
    INSERT INTO pgconsistency.refresh_state AS s
           (invariant, last_run_outcome, last_started_at, last_finished_at, last_duration_seconds, last_error, consecutive_failures)
    VALUES (inv.name, v_status, v_started, v_finished, EXTRACT(epoch FROM v_finished - v_started)::double precision, v_error, 1)
    ON CONFLICT ON CONSTRAINT refresh_state_pkey DO UPDATE
       SET last_run_outcome = EXCLUDED.last_run_outcome, last_started_at = EXCLUDED.last_started_at,
           last_finished_at = EXCLUDED.last_finished_at, last_duration_seconds = EXCLUDED.last_duration_seconds,
           last_error = EXCLUDED.last_error, consecutive_failures = s.consecutive_failures + 1;
    RETURN v_status;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.refresh_invariant(text, boolean) IS
  'Refresh one invariant in the current transaction: a step of the refresh loop of schedulers; by hand, use CALL pgconsistency.refresh() instead';

-- _changed_invariants: the enabled invariants in incremental mode with
-- something to do now: keys pending (their tables were written) or a
-- reconcile recorded (capture_state), and whose incremental_period has
-- passed since their latest refresh started. The others are left alone,
-- whatever they cost: their snapshot is still exact.
CREATE OR REPLACE FUNCTION pgconsistency._changed_invariants(at timestamptz) RETURNS TABLE (name text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT i.name
      FROM pgconsistency.invariant i
      JOIN pgconsistency.capture_state c ON c.invariant = i.name
      LEFT JOIN pgconsistency.refresh_state s ON s.invariant = i.name
     WHERE i.enabled AND i.refresh_mode = 'incremental'
       AND (c.reconcile_reason IS NOT NULL OR EXISTS (SELECT 1 FROM pgconsistency.pending_key p WHERE p.invariant = i.name))
       AND pgconsistency._refresh_due(s.last_started_at, i.incremental_period, at)
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
    PERFORM pgconsistency.capture_wal(); -- first, as in refresh_plan
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
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_catalog.string_agg(pg_catalog.format('CREATE INDEX CONCURRENTLY ON %s (%I);', k.rel, k.cols[1]), ' ' ORDER BY k.rel::text)
      FROM (SELECT pg_catalog.to_regclass(s.relation) AS rel,
                   pgconsistency._key_columns(pg_catalog.to_regclass(s.relation), s.key_expression) AS cols
              FROM pgconsistency.invariant_key_source s
             WHERE s.invariant = _incremental_index_hint.invariant AND s.key_lookup IS NULL
               AND pg_catalog.to_regclass(s.relation) IS NOT NULL) k
     WHERE pg_catalog.cardinality(k.cols) = 1
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                         JOIN pg_catalog.pg_attribute a ON a.attrelid = k.rel AND a.attname = k.cols[1]
                        WHERE i.indrelid = k.rel AND i.indisvalid AND i.indpred IS NULL AND i.indkey[0] = a.attnum)
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

