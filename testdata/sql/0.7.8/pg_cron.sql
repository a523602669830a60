-- Optional: run pgconsistency's refreshes with pg_cron (1.4 or newer; not
-- every server has it, and sql/install.sql does not need it).
--
-- Run this file in the database where pg_cron lives (cron.database_name,
-- usually postgres), naming the database pgconsistency is installed in:
--
--   psql -v ON_ERROR_STOP=1 -d postgres -v database=app -f sql/pg_cron.sql
--
-- It schedules, as the user running it (the owner of the pgconsistency
-- schema, or a member of pgconsistency_refresher from sql/roles.sql):
--   pgconsistency-refresh-<database>  every minute: CALL pgconsistency.refresh()
--       in <database>. That refreshes only the invariants whose refresh_period
--       has passed, and runs a requested refresh (request_refresh) once it is
--       due, so per-minute calls are cheap and requests run on time.
--   pgconsistency-cleanup  daily at 03:17 GMT: deletes the cron.job_run_details
--       rows older than a week of pgconsistency's own jobs (pg_cron never
--       deletes them itself); other jobs' history is left to their owners.
-- Schedules use the 5-field cron syntax of pg_cron 1.4; pg_cron reads them in
-- GMT. Re-running the file updates the jobs in place (they are matched by
-- name): it never duplicates them.

\set ON_ERROR_STOP 1
\if :{?database}
\else
DO $$ BEGIN
    RAISE EXCEPTION 'sql/pg_cron.sql: which database should pg_cron refresh?'
        USING HINT = 'psql -d postgres -v database=app -f sql/pg_cron.sql';
END $$;
\endif

CREATE EXTENSION IF NOT EXISTS pg_cron;

SELECT cron.schedule_in_database(
    'pgconsistency-refresh-' || :'database',
    '* * * * *',
    'CALL pgconsistency.refresh()',
    :'database');

SELECT cron.schedule(
    'pgconsistency-cleanup',
    '17 3 * * *',
    $$DELETE FROM cron.job_run_details
       WHERE end_time < now() - interval '7 days'
         AND jobid IN (SELECT jobid FROM cron.job WHERE jobname LIKE 'pgconsistency-%')$$);
