-- pgconsistency installer: the framework, then the dataset invariant pack.
--
--   psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql
--
-- Idempotent and safe to run on every deployment: unchanged invariants keep
-- their views and snapshots. Each included file runs in its own transaction.
-- Works from any directory (\ir resolves paths relative to this file).

\set ON_ERROR_STOP 1
\set QUIET on
SET client_min_messages = warning;

BEGIN;
\ir framework.sql
COMMIT;

BEGIN;
\o /dev/null
\ir dataset_invariants.sql
\o
COMMIT;
