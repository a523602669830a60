-- pgconsistency framework: privileges. Last, so that they cover every
-- function the files before this one created.

-- PostgreSQL grants EXECUTE on every new function and procedure to PUBLIC.
-- With SECURITY DEFINER that would let any role that can connect refresh,
-- request refreshes, acknowledge anomalies or move log cursors: nobody but
-- the owner may run anything here until sql/roles.sql (or a DBA) grants it.
-- Re-running is harmless, and grants to other roles are kept (CREATE OR
-- REPLACE keeps a function's privileges).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgconsistency FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA pgconsistency FROM PUBLIC;
-- Except the pure check of the invariant table's settings constraint: a
-- CHECK constraint runs its functions with the privileges of whoever writes
-- the table.
GRANT EXECUTE ON FUNCTION pgconsistency._valid_refresh_settings(jsonb) TO PUBLIC;
-- And the version, which the status view calls (a view's functions run with
-- the privileges of the role reading the view).
GRANT EXECUTE ON FUNCTION pgconsistency.version() TO PUBLIC;
-- And the deprecated columns of the status view (until 0.8.0), for the same
-- reason.
GRANT EXECUTE ON FUNCTION pgconsistency._deprecated_column(text, text, anyelement) TO PUBLIC;

-- Where sql/roles.sql ran before (an upgrade), the functions a release adds
-- to what its roles run get their grants now, so that a pg_cron job or a
-- collector running as one of them keeps working before roles.sql is re-run:
-- 0.2.0 added refresh_plan() to the refresh loop, 0.7.0 capture_wal() and refresh_changes_plan(), 0.7.7
-- wal_stream_start() and capture_wal_stream() (the receiver's stream); 0.6.0
-- new_anomalies_with_origin_for_log(), finished_requests_for_log() and
-- advance_request_log_cursor() to the receiver's logs.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgconsistency_refresher') THEN
        GRANT EXECUTE ON FUNCTION pgconsistency.refresh_plan(text, boolean) TO pgconsistency_refresher; -- 0.2.0
        GRANT EXECUTE ON FUNCTION pgconsistency.capture_wal(integer), pgconsistency.refresh_changes_plan() TO pgconsistency_refresher; -- 0.7.0
        GRANT EXECUTE ON FUNCTION pgconsistency.wal_stream_start(),
                                  pgconsistency.capture_wal_stream(text[], text) TO pgconsistency_refresher; -- 0.7.7
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgconsistency_reader') THEN
        GRANT EXECUTE ON FUNCTION pgconsistency.new_anomalies_with_origin_for_log(text, integer),
                                  pgconsistency.finished_requests_for_log(text, integer),
                                  pgconsistency.advance_request_log_cursor(text, bigint) TO pgconsistency_reader; -- 0.6.0
    END IF;
END
$do$;

-- The slot functions belong to pgconsistency_capture where sql/roles.sql
-- created it (0.7.1): each install keeps it so, and lets the schema's owner
-- execute them.
DO $do$
BEGIN
    PERFORM pgconsistency._give_slot_functions_to_capture_role();
END
$do$;
