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
-- Unchanged invariants keep their views and snapshots. Each included file
-- runs in its own transaction. Works from any directory (\ir resolves paths
-- relative to this file).

\set ON_ERROR_STOP 1
\set QUIET on
SET client_min_messages = warning;
\if :{?lock_wait}
\else
\set lock_wait 10s
\endif
SELECT pg_catalog.set_config('pgconsistency.install_lock_wait', :'lock_wait', false) \g /dev/null

BEGIN;
\o /dev/null
\ir framework.sql
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
SELECT pgconsistency.upgrade_defined_views();
SELECT pgconsistency.install_capture();
\o
COMMIT;
