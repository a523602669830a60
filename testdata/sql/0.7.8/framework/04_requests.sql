-- pgconsistency framework: refresh requests ("refresh everything once the
-- deployment has settled") and the deploy marker the receiver watches to
-- make them. refresh_plan (08_refresh.sql) runs a request when it is due.

-- request_refresh: ask for a refresh of every enabled invariant once "delay"
-- has passed without another request. For deploy pipelines and migration
-- tools: SELECT pgconsistency.request_refresh(delay => '10 minutes').
-- The pg_cron job or the receiver's scheduler runs it when due. Returns the
-- time it is due.
CREATE OR REPLACE FUNCTION pgconsistency.request_refresh(
    delay  interval DEFAULT '10 minutes',
    reason text DEFAULT NULL
) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_due timestamptz;
BEGIN
    IF delay IS NULL OR delay < interval '0' THEN
        RAISE EXCEPTION 'pgconsistency: refresh request delay must be zero or more, got %', coalesce(delay::text, 'NULL')
            USING HINT = 'Pass the time the deployment needs to settle, e.g. delay => ''10 minutes''.';
    END IF;
    INSERT INTO pgconsistency.refresh_request AS r (first_requested_at, requested_at, due_at, reason)
    VALUES (pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp() + delay, request_refresh.reason)
    ON CONFLICT ((true)) WHERE claimed_at IS NULL DO UPDATE
       SET requested_at = EXCLUDED.requested_at,
           due_at       = EXCLUDED.due_at,
           requests     = r.requests + 1,
           reason       = coalesce(EXCLUDED.reason, r.reason)
    RETURNING r.due_at INTO v_due;
    RETURN v_due;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.request_refresh(interval, text) IS
  'Request a refresh of every enabled invariant once delay has passed without a new request (after a deployment)';

-- claim_refresh_request: take the pending request if it is due, so that it
-- runs exactly once however many schedulers poll. Returns whether one was
-- claimed. Called by refresh_plan(), and by the schedulers of collectors of
-- release 0.1.0 (granted to pgconsistency_refresher for them by sql/roles.sql).
CREATE OR REPLACE FUNCTION pgconsistency.claim_refresh_request()
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r pgconsistency.refresh_request%ROWTYPE;
BEGIN
    UPDATE pgconsistency.refresh_request q
       SET claimed_at = pg_catalog.clock_timestamp()
     WHERE q.claimed_at IS NULL AND q.due_at <= pg_catalog.clock_timestamp()
    RETURNING q.* INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RAISE NOTICE 'pgconsistency: running the requested refresh of every invariant (% request(s) since %, the last at %)',
        r.requests, r.first_requested_at, r.requested_at
        USING DETAIL = coalesce('reason: ' || r.reason, 'no reason given');
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.claim_refresh_request() IS
  'Take the pending refresh request if it is due, so that it runs once however many schedulers poll; true if one was taken';


-- observe_deploy_marker: record the marker's current value; when it differs
-- from the last one seen, request a refresh after delay (the deployment must
-- settle first) and return true. The first value ever seen only sets the
-- baseline. Several collectors may call it: one of them sees the change.
-- Each value seen (the baseline too) is a row of pgconsistency.deployment
-- (0.6.0), which new anomalies are attributed to.
CREATE OR REPLACE FUNCTION pgconsistency.observe_deploy_marker(value text, delay interval DEFAULT '10 minutes')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old text;
BEGIN
    INSERT INTO pgconsistency.deploy_marker AS m (value, seen_at)
    VALUES (observe_deploy_marker.value, pg_catalog.clock_timestamp())
    ON CONFLICT ON CONSTRAINT deploy_marker_pkey DO NOTHING;
    IF FOUND THEN
        -- baseline: the deployment anomalies are attributed to until the next one
        INSERT INTO pgconsistency.deployment (marker, changed_at) VALUES (observe_deploy_marker.value, pg_catalog.clock_timestamp());
        RETURN false;
    END IF;
    UPDATE pgconsistency.deploy_marker m
       SET value = observe_deploy_marker.value, seen_at = pg_catalog.clock_timestamp(),
           changed_at = pg_catalog.clock_timestamp()
      FROM (SELECT d.value FROM pgconsistency.deploy_marker d FOR UPDATE) old
     WHERE m.value IS DISTINCT FROM observe_deploy_marker.value
    RETURNING old.value INTO v_old;
    IF NOT FOUND THEN
        UPDATE pgconsistency.deploy_marker m SET seen_at = pg_catalog.clock_timestamp();
        RETURN false;
    END IF;
    INSERT INTO pgconsistency.deployment (marker, changed_at) VALUES (observe_deploy_marker.value, pg_catalog.clock_timestamp());
    PERFORM pgconsistency.request_refresh(delay,
        pg_catalog.format('deploy marker changed from %s to %s', coalesce(v_old, 'NULL'), coalesce(value, 'NULL')));
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency.observe_deploy_marker(text, interval) IS
  'Record the deploy marker; on a change, request a refresh after delay. Called by the receiver';

