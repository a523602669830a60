-- pgconsistency installer: the framework, then the dataset invariant pack.
--
--   psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql
--
-- Installs, or upgrades in place an install of any earlier release
-- (SELECT pgconsistency.version() tells which is installed; CHANGELOG.md says
-- what changed). Safe to run on every deployment, while refreshes run and
-- the collector reads: when nothing changed it takes no lock that waits;
-- when something changed, each lock is waited for at most 200 ms at a time,
-- for lock_wait in all (default 10s; psql -v lock_wait=60s to change it),
-- then the install stops, rolled back, with a message to re-run it.
-- Unchanged invariants keep their views and snapshots. The framework (the
-- files of sql/framework/, in the order of their numbers) runs in one
-- transaction, each pack in one of its own. Works from any directory (\ir
-- resolves paths relative to this file).

\set ON_ERROR_STOP 1
\set QUIET on
SET client_min_messages = warning;
\if :{?lock_wait}
\else
\set lock_wait 10s
\endif
SELECT pg_catalog.set_config('pgconsistency.install_lock_wait', :'lock_wait', false) \g /dev/null

-- The framework: schema pgconsistency, its tables, functions and the
-- status view. 01_upgrade.sql runs early: what it renames or adds to the
-- tables of an earlier release is there for the files after it.
BEGIN;
\o /dev/null
\ir framework/00_schema.sql
\ir framework/01_upgrade.sql
\ir framework/02_tables.sql
\ir framework/03_registry.sql
\ir framework/04_requests.sql
\ir framework/05_acknowledgements.sql
\ir framework/06_log.sql
\ir framework/07_capture.sql
\ir framework/07_wal_capture.sql
\ir framework/08_refresh.sql
\ir framework/08_refresh_loop.sql
\ir framework/09_status.sql
\ir framework/10_privileges.sql
\o
COMMIT;

BEGIN;
\o /dev/null
\ir dataset_invariants.sql
\o
COMMIT;

-- After the packs: invariants an older release made with define_invariant
-- that no pack defined again (a user's own) get the views of this release;
-- then the capture triggers of the invariants in incremental mode, on tables
-- a migration may have re-created since the previous install. Neither takes
-- a lock when nothing is to do.
BEGIN;
\o /dev/null
SELECT pgconsistency._upgrade_defined_views();
SELECT pgconsistency._install_capture();
\o
COMMIT;
