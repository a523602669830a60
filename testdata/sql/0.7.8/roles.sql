-- pgconsistency roles: least privilege for the collector, pg_cron and deploy
-- pipelines. Optional; run by the owner of the pgconsistency schema (or a
-- superuser) after sql/install.sql, in the same database:
--
--   psql -v ON_ERROR_STOP=1 -d app -f sql/roles.sql
--
-- It creates two NOLOGIN group roles (once per cluster: roles are global)
-- and grants them, in this database, what they need and nothing else (and
-- the WAL capture's role, pgconsistency_capture: at the end of this file):
--
--   pgconsistency_reader     what the receiver reads each scrape: SELECT on
--       pgconsistency.status; and, for a logs pipeline, EXECUTE on
--       new_anomalies_for_log(), new_anomalies_with_origin_for_log() (0.6.0)
--       and advance_log_cursor(), and for the records of finished refresh
--       requests finished_requests_for_log() and advance_request_log_cursor()
--       (0.6.0) (SECURITY DEFINER:
--       the cursor is written by the functions, the role gets no table
--       privilege; each login role reads and moves only the cursors it
--       created). Not the anomaly views, nor pgconsistency.anomaly, nor the
--       anomalies' details in the log records: they copy application data.
--       To have the details in the log records, grant them on purpose to the
--       collector's login role:
--         GRANT SELECT (details) ON pgconsistency.anomaly TO otel_pgconsistency;
--   pgconsistency_refresher  what refreshes: CALL pgconsistency.refresh(),
--       request_refresh() for deploy pipelines, and what the receiver's
--       scheduler (refresh::poll_interval) and changes loop
--       (refresh::changes_interval) run: refresh_plan(),
--       refresh_changes_plan(), refresh_invariant() and
--       observe_deploy_marker(). The refresh functions are SECURITY DEFINER:
--       a member of the role need not own the views nor read the application
--       tables.
--
-- Neither role gets anything on the application's tables. Give them to login
-- roles:
--
--   CREATE ROLE otel_pgconsistency LOGIN PASSWORD '...';
--   GRANT pgconsistency_reader TO otel_pgconsistency;
--   -- the same collector with refresh::poll_interval set, where pg_cron is
--   -- missing, or with its changes loop (refresh::changes_interval, on by
--   -- default) refreshing invariants in incremental mode:
--   GRANT pgconsistency_refresher TO otel_pgconsistency;
--
--   -- a deploy pipeline that asks for a refresh once the deployment settled,
--   -- or the role that schedules CALL pgconsistency.refresh() in pg_cron:
--   GRANT pgconsistency_refresher TO deployer;
--
-- A collector whose refresh::deploy_marker::query reads an application table
-- (e.g. schema_migrations) needs SELECT on that table too: grant it to its
-- login role, not to the group role.
--
-- Acknowledging anomalies is an operator's decision, given to no role here:
--
--   GRANT USAGE ON SCHEMA pgconsistency TO oncall;
--   GRANT EXECUTE ON FUNCTION pgconsistency.acknowledge(text, text, text, timestamptz),
--                             pgconsistency.acknowledge_all(text, text, timestamptz),
--                             pgconsistency.unacknowledge(text, text) TO oncall;
--
-- Idempotent: re-run it freely, after every install.sql too (install.sql keeps
-- these grants; re-running does no harm). Creating the roles needs CREATEROLE
-- the first time; afterwards only the grants run.

\set ON_ERROR_STOP 1

DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN VALUES
        ('pgconsistency_reader', 'pgconsistency: reads pgconsistency.status and delivers new anomalies as logs; nothing of the application tables'),
        ('pgconsistency_refresher', 'pgconsistency: refreshes the invariants and requests refreshes; nothing of the application tables')
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r.column1) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r.column1);
                EXECUTE pg_catalog.format('COMMENT ON ROLE %I IS %L', r.column1, r.column2);
            EXCEPTION WHEN duplicate_object THEN
                NULL; -- created meanwhile from another database of the cluster
            END;
        END IF;
    END LOOP;
    -- Where CONNECT was revoked from PUBLIC, the roles still reach this database.
    EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO pgconsistency_reader, pgconsistency_refresher',
                              pg_catalog.current_database());
END
$do$;

GRANT USAGE ON SCHEMA pgconsistency TO pgconsistency_reader, pgconsistency_refresher;

-- The reader: the receiver's metrics and logs.
GRANT SELECT ON pgconsistency.status TO pgconsistency_reader;
GRANT EXECUTE ON FUNCTION pgconsistency.new_anomalies_for_log(text, integer),
                          pgconsistency.new_anomalies_with_origin_for_log(text, integer),
                          pgconsistency.advance_log_cursor(text, bigint),
                          pgconsistency.finished_requests_for_log(text, integer),
                          pgconsistency.advance_request_log_cursor(text, bigint)
   TO pgconsistency_reader;

-- pgconsistency_refresher. refresh() runs as its caller (a procedure that commits
-- cannot be SECURITY DEFINER): it calls the SECURITY DEFINER functions
-- below; the receiver's scheduler does the same one statement at a time.
-- SELECT on the registry and claim_refresh_request() are what schedulers of
-- release 0.1.0 call: kept so a collector upgraded after the SQL works.
GRANT SELECT ON pgconsistency.invariant TO pgconsistency_refresher;
GRANT EXECUTE ON PROCEDURE pgconsistency.refresh(text, boolean) TO pgconsistency_refresher;
GRANT EXECUTE ON FUNCTION pgconsistency.refresh_plan(text, boolean),
                          pgconsistency.refresh_changes_plan(),
                          pgconsistency.refresh_invariant(text, boolean),
                          pgconsistency.claim_refresh_request(),
                          pgconsistency.expire_acknowledgements(),
                          pgconsistency.request_refresh(interval, text),
                          pgconsistency.observe_deploy_marker(text, interval),
                          pgconsistency.capture_wal(integer),
                          pgconsistency.wal_stream_start(),
                          pgconsistency.capture_wal_stream(text[], text)
   TO pgconsistency_refresher;

-- pgconsistency_capture (0.7.1): the WAL capture's role, NOLOGIN with
-- REPLICATION and nothing else. It owns the four slot functions (create,
-- drop, advance and read the capture's slot: SECURITY DEFINER, executable
-- only by the owner of the pgconsistency schema, whose capture_wal and
-- set_capture call them), so that neither a login role nor the schema's
-- owner needs REPLICATION. Creating a role with REPLICATION takes a
-- superuser; run as another role with CREATEROLE, the role is created
-- without it and the NOTICE says what to run (on Amazon RDS and Aurora the
-- master user grants it rds_replication here). The owner of the schema
-- becomes a member, so that install.sql can replace the slot functions on
-- upgrades (on PostgreSQL 15 a member can also SET ROLE to it: the schema's
-- owner is trusted with the WAL capture; the collector's roles are not).
DO $do$
DECLARE
    v_super boolean := (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);
    v_owner name := (SELECT n.nspowner::regrole::name FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgconsistency');
BEGIN
    IF pg_catalog.to_regrole('pgconsistency_capture') IS NULL THEN
        BEGIN
            IF v_super THEN
                CREATE ROLE pgconsistency_capture NOLOGIN REPLICATION;
            ELSE
                CREATE ROLE pgconsistency_capture NOLOGIN;
            END IF;
            COMMENT ON ROLE pgconsistency_capture IS
              'pgconsistency: owns the WAL capture''s slot functions (REPLICATION); no login, nothing of the application tables';
        EXCEPTION WHEN duplicate_object THEN
            NULL; -- created meanwhile from another database of the cluster
        END;
    END IF;
    IF NOT v_super THEN
        IF pg_catalog.to_regrole('rds_replication') IS NOT NULL THEN
            BEGIN
                GRANT rds_replication TO pgconsistency_capture;
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'pgconsistency: could not grant rds_replication to pgconsistency_capture; the WAL capture needs it: as the master user, GRANT rds_replication TO pgconsistency_capture;';
            END;
        ELSIF NOT (SELECT r.rolreplication FROM pg_catalog.pg_roles r WHERE r.rolname = 'pgconsistency_capture') THEN
            RAISE NOTICE 'pgconsistency: the role pgconsistency_capture has no REPLICATION; the WAL capture needs it: as a superuser, ALTER ROLE pgconsistency_capture REPLICATION;';
        END IF;
        -- ALTER FUNCTION ... OWNER by a role that is not a superuser: the new
        -- owner must be able to create in the schema.
        GRANT CREATE ON SCHEMA pgconsistency TO pgconsistency_capture;
    END IF;
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = v_owner) THEN
        EXECUTE pg_catalog.format('GRANT pgconsistency_capture TO %I', v_owner);
    END IF;
    PERFORM pgconsistency._give_slot_functions_to_capture_role();
END
$do$;
