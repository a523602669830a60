-- pgconsistency framework: the registry of invariants, their refresh state,
-- the refresh procedure and the status view the receiver reads. It is the
-- files of sql/framework/, which sql/install.sql runs in the order of their
-- numbers, in one transaction. This one: the schema, version(), and the
-- helpers the installer changes objects with.
--
-- Idempotent: safe to run again on every deployment (install.sql includes it).
-- Every name is schema-qualified and every function pins its search_path,
-- because PostgreSQL 17+ runs REFRESH MATERIALIZED VIEW with a safe search_path
-- and because callers (pg_cron, deploy tools) may have any search_path.
-- A function that a refresh or the changes loop calls once per invariant or
-- per pass is PL/pgSQL, even when its body is one SELECT: PostgreSQL keeps a
-- PL/pgSQL function's plans for the session, but plans the body of an SQL
-- function with a SET clause anew at every call (never inlined): about a
-- fifth of what a refresh cost beside its keys before 0.7.3 (BENCHMARKS.md).
-- SQL functions stay where one query calls them row by row.
--
-- Names: a function whose name starts with an underscore (_install_ddl) is
-- internal to pgconsistency: its comment starts with "Internal:", and it may
-- change or go in any release. The others (define_invariant, refresh, the
-- status view, ...) are what users, pg_cron, deploy tools and the receiver
-- call; each has a COMMENT saying what it is for (\df+ pgconsistency.*).
--
-- Privileges: the functions that refresh or write pgconsistency's state are
-- SECURITY DEFINER (they run as the owner of the schema, who owns the views),
-- so that a role granted EXECUTE on them needs no privilege on the tables
-- behind them, nor on the application's tables. EXECUTE is revoked from
-- PUBLIC by 10_privileges.sql; sql/roles.sql grants what a reader (the
-- receiver) and a refresher role (pg_cron, deploy pipelines) need.

CREATE SCHEMA IF NOT EXISTS pgconsistency;

DO $do$
BEGIN
    IF pg_catalog.obj_description((SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgconsistency'), 'pg_namespace')
       IS DISTINCT FROM 'pgconsistency: data-consistency invariants, their anomalies, refresh state and status' THEN
        COMMENT ON SCHEMA pgconsistency IS
          'pgconsistency: data-consistency invariants, their anomalies, refresh state and status';
    END IF;
END
$do$;

-- version: the version of the SQL installed, the top entry of CHANGELOG.md.
-- install.sql upgrades any older install in place (01_upgrade.sql): the
-- _install_* helpers below add what an older release lacks, without waiting
-- on locks when nothing is missing.
CREATE OR REPLACE FUNCTION pgconsistency.version() RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT '0.7.8'::text $fn$;
COMMENT ON FUNCTION pgconsistency.version() IS
  'The version of the pgconsistency SQL installed (the top release of CHANGELOG.md)';

-- _install_ddl: run one DDL statement of an install or upgrade with bounded
-- lock waits. install.sql runs on every deployment, while refreshes and
-- readers hold locks on pgconsistency's tables: a DDL statement that waits
-- for its lock queues every later reader behind it. So each attempt waits at
-- most 200 ms for its locks, then lets the readers through for a second and
-- tries again, until pgconsistency.install_lock_wait (default 10 s, set by
-- install.sql from psql's -v lock_wait=...) has passed; then the install
-- fails, rolled back whole, with a message that says to re-run it.
-- Internal to the installer and define_invariant. Callers run it only when
-- the catalog says the change is needed, so an unchanged install takes no
-- lock that can wait.
CREATE OR REPLACE FUNCTION pgconsistency._install_ddl(ddl text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_budget   interval := coalesce(NULLIF(pg_catalog.current_setting('pgconsistency.install_lock_wait', true), ''), '10 s')::interval;
    v_deadline timestamptz := pg_catalog.clock_timestamp() + v_budget;
    v_attempts integer := 0;
    v_saved    text := pg_catalog.current_setting('lock_timeout');
BEGIN
    LOOP
        v_attempts := v_attempts + 1;
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
            EXECUTE ddl;
            PERFORM pg_catalog.set_config('lock_timeout', v_saved, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_catalog.set_config('lock_timeout', v_saved, true);
            IF pg_catalog.clock_timestamp() + interval '1 second' > v_deadline THEN
                RAISE EXCEPTION 'pgconsistency: install stopped: another session held a lock it needs for % (% attempts in %); nothing was changed',
                    pg_catalog.left(pg_catalog.regexp_replace(pg_catalog.btrim(ddl), '\s+', ' ', 'g'), 120), v_attempts, v_budget
                    USING ERRCODE = 'lock_not_available',
                          HINT = 'A refresh or a long transaction holds a lock on pgconsistency''s objects (pg_locks shows which). '
                                 'Re-run install.sql: it is safe to repeat. '
                                 'To wait longer: psql -v lock_wait=60s -f install.sql.';
            END IF;
            PERFORM pg_catalog.pg_sleep(1);
        END;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_ddl(text) IS
  'Internal: run a DDL statement of the installer with short lock waits and retries, failing with a hint to re-run';

-- _install_comment: COMMENT ON a relation only when the comment differs (a
-- COMMENT takes a SHARE UPDATE EXCLUSIVE lock on its table).
CREATE OR REPLACE FUNCTION pgconsistency._install_comment(relation text, comment text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_rel regclass := pg_catalog.to_regclass(relation);
    v_kind text;
BEGIN
    IF v_rel IS NULL OR pg_catalog.obj_description(v_rel, 'pg_class') IS NOT DISTINCT FROM comment THEN
        RETURN;
    END IF;
    SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END
      INTO v_kind FROM pg_catalog.pg_class c WHERE c.oid = v_rel;
    PERFORM pgconsistency._install_ddl(pg_catalog.format('COMMENT ON %s %s IS %L', v_kind, v_rel, comment));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_comment(text, text) IS
  'Internal: set a relation''s comment when it differs, with the installer''s bounded lock waits';

-- _install_column: ALTER TABLE ... ADD COLUMN when the column is missing (an
-- upgrade); ADD COLUMN IF NOT EXISTS would take its ACCESS EXCLUSIVE lock
-- first and check afterwards.
CREATE OR REPLACE FUNCTION pgconsistency._install_column(relation text, col text, definition text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = relation::regclass AND a.attname = col AND NOT a.attisdropped) THEN
        PERFORM pgconsistency._install_ddl(pg_catalog.format('ALTER TABLE %s ADD COLUMN %I %s', relation, col, definition));
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_column(text, text, text) IS
  'Internal: add a column missing from an older install, with the installer''s bounded lock waits';

-- _install_index: CREATE INDEX when no relation of that name exists
-- (CREATE INDEX IF NOT EXISTS takes its SHARE lock before it checks).
CREATE OR REPLACE FUNCTION pgconsistency._install_index(name text, ddl text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.to_regclass('pgconsistency.' || pg_catalog.quote_ident(name)) IS NULL THEN
        PERFORM pgconsistency._install_ddl(ddl);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_index(text, text) IS
  'Internal: create an index missing from an older install, with the installer''s bounded lock waits';

-- _install_view: create the plain view "relation" (schema-qualified) as
-- "definition", or re-create it when its definition differs (compared
-- through a temporary view: both deparsed by PostgreSQL with every name
-- qualified) or when a materialized view of that name is there (the
-- invariant views of releases before 0.3.0). DROP takes an ACCESS
-- EXCLUSIVE lock that would queue the readers behind it on every deployment:
-- so nothing is dropped when nothing changed, and the drop waits with the
-- installer's bounded lock waits. The grants on the old relation are given
-- to the new view. Returns whether it (re-)created the view.
CREATE OR REPLACE FUNCTION pgconsistency._install_view(relation text, definition text, comment text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old  regclass := pg_catalog.to_regclass(relation);
    v_kind "char";
    v_acl  aclitem[];
    v_owner oid;
    g record;
BEGIN
    SELECT c.relkind, c.relacl, c.relowner INTO v_kind, v_acl, v_owner FROM pg_catalog.pg_class c WHERE c.oid = v_old;
    IF v_kind = 'v' THEN
        IF pg_catalog.to_regclass('pg_temp.pgconsistency_view_next') IS NOT NULL THEN
            DROP VIEW pg_temp.pgconsistency_view_next;
        END IF;
        EXECUTE 'CREATE TEMPORARY VIEW pgconsistency_view_next AS ' || definition;
        IF pg_catalog.pg_get_viewdef(v_old) = pg_catalog.pg_get_viewdef(pg_catalog.to_regclass('pg_temp.pgconsistency_view_next')) THEN
            DROP VIEW pg_temp.pgconsistency_view_next;
            PERFORM pgconsistency._install_comment(relation, comment);
            RETURN false;
        END IF;
        DROP VIEW pg_temp.pgconsistency_view_next;
    END IF;
    IF v_kind = 'v' THEN
        PERFORM pgconsistency._install_ddl(pg_catalog.format('DROP VIEW %s', v_old));
    ELSIF v_kind = 'm' THEN
        PERFORM pgconsistency._install_ddl(pg_catalog.format('DROP MATERIALIZED VIEW %s', v_old));
    ELSIF v_kind IS NOT NULL THEN
        RAISE EXCEPTION 'pgconsistency: % exists and is not a view (relkind %)', relation, v_kind
            USING HINT = 'Rename or drop it, or choose another name.';
    END IF;
    EXECUTE pg_catalog.format('CREATE VIEW %s AS %s', relation, definition);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', relation, comment);
    FOR g IN
        SELECT a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END AS grantee
          FROM pg_catalog.aclexplode(v_acl) a
         WHERE a.grantee <> v_owner AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER')
    LOOP
        EXECUTE pg_catalog.format('GRANT %s ON %s TO %s%s', g.privilege_type, relation, g.grantee,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._install_view(text, text, text) IS
  'Internal: create or re-create a view only when its definition changed, keeping its grants';

