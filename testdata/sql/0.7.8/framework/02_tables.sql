-- pgconsistency framework: every table, with its columns, indexes and
-- comment, as a fresh install creates it. An install of an earlier release
-- already has most of them: CREATE TABLE IF NOT EXISTS leaves those alone,
-- and 01_upgrade.sql has added the columns they lacked. Indexes are created
-- only when missing (_install_index), on fresh installs and upgrades alike.

-- _valid_refresh_settings: the settings an invariant's refresh may change:
-- the planner's and the memory of one query; never anything that outlives
-- the refresh's transaction or touches security (set_config(..., true) is
-- transaction-local). Here, before the tables, because the CHECK constraint
-- invariant_settings_valid of the invariant table calls it (for every role
-- that writes the table: 10_privileges.sql grants it to PUBLIC). A name not
-- allowed makes it false (the constraint's error); a value the setting does
-- not take (0.7.0: {"work_mem": "64MB; DROP TABLE accounts"}) is refused
-- with PostgreSQL's message, when written rather than at every refresh: it
-- is tried with set_config in a subtransaction that is then undone.
CREATE OR REPLACE FUNCTION pgconsistency._valid_refresh_settings(settings jsonb) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    e record;
    v_error text;
BEGIN
    IF settings IS NULL OR pg_catalog.jsonb_typeof(settings) <> 'object' THEN
        RETURN false;
    END IF;
    FOR e IN SELECT x.k, x.v FROM pg_catalog.jsonb_each(settings - 'incremental') AS x(k, v) LOOP
        IF e.k !~ '^(enable_[a-z_]+|work_mem|hash_mem_multiplier|max_parallel_workers_per_gather|random_page_cost|seq_page_cost|cpu_[a-z_]+_cost|effective_cache_size|jit|temp_buffers)$'
           OR pg_catalog.jsonb_typeof(e.v) NOT IN ('string', 'number', 'boolean') THEN
            RETURN false;
        END IF;
        BEGIN
            PERFORM pg_catalog.set_config(e.k, e.v #>> '{}', true);
            RAISE SQLSTATE 'PCOK1'; -- undo it: the subtransaction rolls back
        EXCEPTION
            WHEN SQLSTATE 'PCOK1' THEN
                NULL; -- taken
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                RAISE EXCEPTION 'pgconsistency: an invariant''s refresh setting % = % is refused: %', e.k, e.v, v_error
                    USING ERRCODE = 'check_violation',
                          HINT = 'A value the setting takes in SET, e.g. {"work_mem": "64MB"} or {"enable_hashjoin": "off"}.';
        END;
    END LOOP;
    -- 0.3.0: "incremental": the settings of incremental re-checks, the same names
    RETURN NOT settings ? 'incremental'
        OR (pg_catalog.jsonb_typeof(settings -> 'incremental') = 'object'
            AND NOT settings -> 'incremental' ? 'incremental'
            AND pgconsistency._valid_refresh_settings(settings -> 'incremental'));
END
$fn$;
COMMENT ON FUNCTION pgconsistency._valid_refresh_settings(jsonb) IS
  'Internal: whether refresh settings name only planner and memory settings, with values they take (the CHECK constraint of invariant.settings)';

-- The registry: one row per invariant. Its anomalies are shown by a view
-- (view_schema.view_name) with a text column "key" that identifies the
-- entity each anomaly is about: for an invariant of define_invariant(), the
-- plain view pgconsistency.<name> of its open anomalies; for one of
-- register_invariant(), the user's materialized view (with a unique index
-- on key, so REFRESH ... CONCURRENTLY works), which each refresh refreshes:
-- the only invariants still held by a materialized view.
-- The view is stored by name (schema and name as text), not as regclass:
-- define_invariant re-creates a view whose definition changed, which gives
-- it a new OID, and the registry must survive that.
CREATE TABLE IF NOT EXISTS pgconsistency.invariant (
    name          text        PRIMARY KEY
                              CONSTRAINT invariant_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description   text        NOT NULL,
    severity      text        NOT NULL
                              CONSTRAINT invariant_severity_valid CHECK (severity IN ('critical', 'warning', 'info')),
    view_schema   text        NOT NULL,
    view_name     text        NOT NULL,
    enabled       boolean     NOT NULL DEFAULT true,
    -- CALL pgconsistency.refresh() refreshes the invariant once this long has
    -- passed since its previous refresh started (up to a tenth of it, at most
    -- 30 s, early: a schedule whose tick equals the period must not miss
    -- every other tick because of a few milliseconds of jitter).
    refresh_period    interval NOT NULL DEFAULT '30 minutes'
                               CONSTRAINT invariant_refresh_period_positive CHECK (refresh_period > interval '0'),
    -- Guardrails of one refresh. lock_timeout bounds every lock wait of the
    -- refresh; statement_timeout bounds the refresh when it runs as a statement
    -- of its own (the receiver's scheduler does that: PostgreSQL arms
    -- statement_timeout once per top-level statement, not inside a procedure).
    statement_timeout interval NOT NULL DEFAULT '30 minutes'
                               CONSTRAINT invariant_statement_timeout_positive CHECK (statement_timeout > interval '0'),
    lock_timeout      interval NOT NULL DEFAULT '30 seconds'
                               CONSTRAINT invariant_lock_timeout_positive CHECK (lock_timeout > interval '0'),
    -- Planner settings of this invariant's refresh, e.g. {"enable_hashjoin": "off"}
    -- (see _valid_refresh_settings for the names allowed). Every refresh
    -- runs with max_parallel_workers_per_gather = 0 unless this says otherwise.
    settings      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- after_refresh: optional function (schema-qualified name, one text
    -- argument: the invariant's name) that refresh_invariant calls after a
    -- successful refresh, in the same transaction, e.g. to remember counters
    -- the next refresh compares with (the operations pack's deadlocks_detected).
    after_refresh text,
    -- Resolved anomalies are deleted this long after they were resolved (by
    -- the invariant's refresh), once every log consumer has read them.
    resolved_retention interval NOT NULL DEFAULT '30 days'
                                CONSTRAINT invariant_resolved_retention_positive CHECK (resolved_retention > interval '0'),
    -- md5 of the query when the view was created by define_invariant();
    -- NULL for views registered with register_invariant().
    query_md5     text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    -- The refresh engine (0.3.0). query: what define_invariant() was given
    -- (the framework runs it; NULL for views of register_invariant()).
    query         text,
    -- relations: the relations the query reads (schema-qualified), as of define_invariant().
    relations     text[],
    -- refresh_mode: 'full' re-runs the query; 'incremental' re-checks only
    -- the keys that writes touched (see set_refresh_mode), with a full
    -- refresh (a reconcile) every full_refresh_period, and instead of an
    -- incremental one when more than incremental_max_keys keys changed.
    refresh_mode  text        NOT NULL DEFAULT 'full'
                              CONSTRAINT invariant_refresh_mode_valid CHECK (refresh_mode IN ('full', 'incremental')),
    full_refresh_period  interval NOT NULL DEFAULT '1 day'
                                  CONSTRAINT invariant_full_refresh_period_positive CHECK (full_refresh_period > interval '0'),
    incremental_max_keys bigint   NOT NULL DEFAULT 20000
                                  CONSTRAINT invariant_incremental_max_keys_positive CHECK (incremental_max_keys > 0),
    -- In incremental mode, the changes to its tables are refreshed as soon
    -- as a refresh loop sees them (refresh_changes_plan), at most once per
    -- incremental_period (0.7.0): writes in between are taken together.
    incremental_period   interval NOT NULL DEFAULT '2 seconds'
                                  CONSTRAINT invariant_incremental_period_positive CHECK (incremental_period > interval '0'),
    -- Who answers for the invariant's alerts (0.5.0): owner is a team (or
    -- person) name, the label Alertmanager routes on; runbook_url the page
    -- its anomaly alerts link to. NULL: unset (the alerts then carry the
    -- default owner and the generic runbook). Set by define_invariant() and
    -- register_invariant() only where unset, so that re-running install.sql
    -- or a pack keeps what set_owner() (or an UPDATE) set since.
    owner         text
                  CONSTRAINT invariant_owner_valid
                  CHECK (owner ~ '^\S(.*\S)?$' AND owner !~ '[[:cntrl:]]' AND pg_catalog.length(owner) <= 128),
    runbook_url   text
                  CONSTRAINT invariant_runbook_url_valid
                  CHECK (runbook_url ~ '^https?://\S+$' AND pg_catalog.length(runbook_url) <= 2048),
    CONSTRAINT invariant_view_unique UNIQUE (view_schema, view_name),
    CONSTRAINT invariant_settings_valid CHECK (pgconsistency._valid_refresh_settings(settings))
);
SELECT pgconsistency._install_comment('pgconsistency.invariant',
  'Registered invariants: one view of its anomalies each');

-- Parameters of invariants (thresholds and the like): the invariant's query
-- reads them with pgconsistency.parameter(invariant, name), so they change
-- with set_parameter() and no SQL file is edited. Each has a type its value
-- must cast to.
CREATE TABLE IF NOT EXISTS pgconsistency.invariant_parameter (
    invariant   text    NOT NULL REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    name        text    NOT NULL,
    value       text    NOT NULL,
    type        regtype NOT NULL,
    default_value text  NOT NULL,
    description text,
    PRIMARY KEY (invariant, name)
);
SELECT pgconsistency._install_comment('pgconsistency.invariant_parameter',
  'Parameters (thresholds) of invariants; change them with pgconsistency.set_parameter()');

-- The cause of an anomaly (0.7.0): the one contract between the refresh
-- and a pack that records the changes to the application's tables (the
-- audit pack): for a key about to become an anomaly, the recorded change
-- that caused it. The refresh asks for them through _anomaly_causes() and
-- writes them to the anomaly's cause_* columns.
DO $do$
BEGIN
    IF pg_catalog.to_regtype('pgconsistency.anomaly_cause') IS NULL THEN
        CREATE TYPE pgconsistency.anomaly_cause AS (
            key              text,        -- the anomaly's key
            audit_id         bigint,      -- the pack's id of the change (audit_log.id)
            operation        text,        -- INSERT, UPDATE, DELETE or TRUNCATE
            tbl              text,        -- the table changed, schema-qualified
            txid             bigint,      -- the transaction that made it
            changed_at       timestamptz,
            db_user          text,        -- the database user that made it
            application_name text);       -- and its application_name
        COMMENT ON TYPE pgconsistency.anomaly_cause IS
          'The recorded change that caused an anomaly: what a pack that records changes gives the refresh';
    END IF;
END
$do$;

-- Refresh state: written only by pgconsistency.refresh(), one row per invariant
-- that has been refreshed (or attempted) at least once.
CREATE TABLE IF NOT EXISTS pgconsistency.refresh_state (
    invariant                text        PRIMARY KEY
                                         REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    -- the latest attempt that ran (skips do not count as attempts)
    last_run_outcome         text        NOT NULL
                                         CONSTRAINT refresh_state_run_outcome_valid CHECK (last_run_outcome IN ('succeeded', 'failed', 'timed_out')),
    last_started_at          timestamptz NOT NULL,
    last_finished_at         timestamptz NOT NULL,
    last_duration_seconds    double precision NOT NULL,
    last_error               text,
    -- the latest successful refresh: what the snapshot holds
    refreshed_at             timestamptz,
    snapshot_duration_seconds double precision,
    anomalies                bigint      NOT NULL DEFAULT 0,
    new_anomalies            bigint      NOT NULL DEFAULT 0,
    resolved_anomalies       bigint      NOT NULL DEFAULT 0,
    -- open anomalies acknowledged (not in "anomalies"), kept current by
    -- acknowledge(), unacknowledge() and the expiry in refresh()
    acknowledged_anomalies   bigint      NOT NULL DEFAULT 0,
    consecutive_failures     integer     NOT NULL DEFAULT 0,
    -- the latest refresh skipped because another one held the invariant's lock
    last_skipped_at          timestamptz,
    skips                    bigint      NOT NULL DEFAULT 0,
    -- The refresh engine (0.3.0): what kind the latest successful refresh
    -- was ('full', 'incremental' or 'reconcile': a full refresh of an
    -- invariant in incremental mode), when the latest full one (a reconcile
    -- included) started, how many keys the latest incremental one
    -- re-checked, and how many anomalies the latest reconcile had to correct
    -- because the incremental refreshes had missed them (0 when capture
    -- works; see capture_state).
    last_refresh_kind        text
                             CONSTRAINT refresh_state_kind_valid CHECK (last_refresh_kind IN ('full', 'incremental', 'reconcile')),
    last_full_refresh_at     timestamptz,
    rechecked_keys           bigint      NOT NULL DEFAULT 0,
    healed_anomalies         bigint      NOT NULL DEFAULT 0,
    last_healed_at           timestamptz,
    -- Where the new anomalies of the latest successful refresh came from
    -- (0.6.0); NULL when it found none. The deployment they appeared after
    -- (pgconsistency.deployment; its marker and time copied: the status view
    -- reads the state rows only) and whether it came after the previous
    -- successful refresh started (false: no deployment since the last clean
    -- refresh); how many of them have a recorded cause (audit pack), and
    -- the latest of those causes (the audit_log row changed last). The
    -- status view shows them; the receiver turns them into the metrics the
    -- new-anomalies alert names the deployment and the cause from.
    new_deployment_id        bigint,
    new_deploy_marker        text,
    new_deployed_at          timestamptz,
    new_deployed_since_previous_refresh boolean,
    new_causes               bigint,
    new_cause_audit_id       bigint,
    new_cause_operation      text,
    new_cause_table          text,
    new_cause_txid           bigint,
    new_cause_changed_at     timestamptz,
    new_cause_db_user        text,
    new_cause_application_name text,
    -- The indexes that would make the latest incremental refresh cheap
    -- (0.7.0): CREATE INDEX statements for the tables it reads whose key has
    -- no index (it then ran as a hash join over those tables, not as lookups
    -- by key); NULL when every key has one.
    incremental_index_hint   text
);
SELECT pgconsistency._install_comment('pgconsistency.refresh_state',
  'Outcome of the latest refresh of each invariant; written by pgconsistency.refresh()');

-- The lifecycle of every anomaly, by invariant and key: first seen, last seen,
-- resolved, acknowledged. It is what tells a new anomaly from an old one
-- even when the total count stays the same. A resolved anomaly that comes
-- back is new again (new seq, new first_seen_at, acknowledgement cleared).
-- Resolved anomalies are deleted after their invariant's resolved_retention.
-- The open anomalies of an invariant are also its snapshot: details holds
-- the anomaly's row of the invariant's query as of the latest refresh, and
-- the view pgconsistency.<name> of define_invariant() reads it. A refresh writes
-- O(changes): rows that appear, resolve or whose details change; nothing
-- for an anomaly that simply persists. So last_seen_at is written when an
-- anomaly appears and when it is resolved (then: the end of the latest
-- refresh that still saw it); while it is open, it was last seen by its
-- invariant's latest refresh (refresh_state.refreshed_at).
-- seq orders the log records: it is taken under a lock held until commit
-- (see refresh_invariant), so seqs become visible in increasing order.
CREATE SEQUENCE IF NOT EXISTS pgconsistency.anomaly_seq;
CREATE TABLE IF NOT EXISTS pgconsistency.anomaly (
    invariant       text        NOT NULL
                                REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    key             text        NOT NULL,
    -- increases each time the anomaly appears: the order of the log records
    seq             bigint      NOT NULL,
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    resolved_at     timestamptz,
    -- the anomaly's row of the invariant's query (without key) as of the
    -- latest refresh that saw it
    details         jsonb,
    acknowledged_at timestamptz,
    acknowledged_by text,
    acknowledged_reason text,
    acknowledged_until  timestamptz,
    -- The names of acknowledged_reason and acknowledged_until before 0.4.0,
    -- read-only, until 0.8.0 (deprecated).
    ack_reason      text        GENERATED ALWAYS AS (acknowledged_reason) STORED,
    ack_until       timestamptz GENERATED ALWAYS AS (acknowledged_until) STORED,
    -- Where it came from (0.6.0), written when it appears: the deployment
    -- current at the refresh that found it (pgconsistency.deployment: the
    -- latest deploy marker value seen, and when it changed; anomaly_origin
    -- shows them), whether that
    -- deployment came after the invariant's previous successful refresh
    -- started (false: no deployment since the last clean refresh), and the
    -- reason of the refresh request that led to that refresh, if any.
    deployment_id   bigint,
    deployed_since_previous_refresh boolean,
    refresh_reason  text,
    -- The change that caused it (0.6.0), when the audit pack (sql/audit.sql)
    -- records a table the invariant reads: the last audit_log row of the key
    -- in those tables before first_seen_at. NULL: no cause recorded.
    cause_audit_id  bigint,
    cause_operation text,
    cause_table     text,
    cause_txid      bigint,
    cause_changed_at timestamptz,
    cause_db_user   text,
    cause_application_name text,
    PRIMARY KEY (invariant, key)
);
SELECT pgconsistency._install_index('anomaly_open',
  'CREATE INDEX anomaly_open ON pgconsistency.anomaly (invariant) WHERE resolved_at IS NULL');
SELECT pgconsistency._install_index('anomaly_seq_idx',
  'CREATE INDEX anomaly_seq_idx ON pgconsistency.anomaly (seq)');
-- Since 0.2.0: the expiry of acknowledgements and the retention of resolved
-- anomalies read only the rows they change.
SELECT pgconsistency._install_index('anomaly_acknowledged_until',
  'CREATE INDEX anomaly_acknowledged_until ON pgconsistency.anomaly (acknowledged_until) WHERE acknowledged_until IS NOT NULL');
SELECT pgconsistency._install_index('anomaly_resolved',
  'CREATE INDEX anomaly_resolved ON pgconsistency.anomaly (invariant, resolved_at) WHERE resolved_at IS NOT NULL');
-- Since 0.6.0: finished_requests_for_log counts the anomalies a requested
-- refresh found (first seen between its claim and its end) in the rows it
-- counts, not in the whole table.
SELECT pgconsistency._install_index('anomaly_first_seen',
  'CREATE INDEX anomaly_first_seen ON pgconsistency.anomaly (first_seen_at)');
SELECT pgconsistency._install_comment('pgconsistency.anomaly',
  'Anomalies by invariant and key: first seen, last seen, resolved, acknowledged');
DO $do$
DECLARE
    c record;
BEGIN
    -- only when it differs: a COMMENT locks the relation
    FOR c IN SELECT v.col, v.comment
               FROM (VALUES ('ack_reason', 'Deprecated (removed in 0.8.0), read-only: acknowledged_reason under its name before 0.4.0'),
                 ('ack_until', 'Deprecated (removed in 0.8.0), read-only: acknowledged_until under its name before 0.4.0')) AS v(col, comment)
              WHERE pg_catalog.col_description('pgconsistency.anomaly'::regclass,
                        (SELECT a.attnum FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = 'pgconsistency.anomaly'::regclass AND a.attname = v.col)) IS DISTINCT FROM v.comment
    LOOP
        EXECUTE pg_catalog.format('COMMENT ON COLUMN pgconsistency.anomaly.%I IS %L', c.col, c.comment);
    END LOOP;
END
$do$;

-- Where each log consumer (a receiver in a logs pipeline, by component id)
-- is in the sequence of new anomalies: each anomaly is logged once.
-- owner: the role that created the cursor; only it (or a role with the
-- privileges of pgconsistency's owner) reads and moves it. NULL for cursors
-- made before 0.2.0: the next role to use it becomes its owner.
-- last_request_id (0.6.0): where the consumer is in the refresh requests
-- whose refresh finished (finished_requests_for_log); NULL until the
-- consumer first asks for them.
CREATE TABLE IF NOT EXISTS pgconsistency.log_cursor (
    consumer   text        PRIMARY KEY,
    last_seq   bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    owner      text,
    last_request_id bigint
);
SELECT pgconsistency._install_comment('pgconsistency.log_cursor',
  'Last anomaly seq delivered to each log consumer');

-- Incremental refresh (0.3.0). How the rows of a table an invariant reads
-- map to the invariant's keys: an SQL expression over the changed row r,
-- giving its key (e.g. r.dataset_id::text), recorded by the capture trigger;
-- or, when the keys are found through another table (an account's
-- datasets), the expression records a value of the row (r.id::text) and a
-- lookup query turns the values into keys when the refresh runs. The lookup
-- must run then, not in the writer's transaction: there it would miss rows
-- that another transaction, not yet committed, moves to that account.
-- Given to define_invariant(keys => ...).
CREATE TABLE IF NOT EXISTS pgconsistency.invariant_key_source (
    invariant      text NOT NULL REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    relation       text NOT NULL,
    key_expression text NOT NULL,
    -- When the row's keys are found through another table: a query run by
    -- the refresh, in its own snapshot, with the values key_expression
    -- gave as $1 (text[]), returning the keys. NULL: those values are the keys.
    key_lookup     text,
    -- The columns of the table that the invariant's query and the key
    -- expression read (0.7.5): an UPDATE that leaves each of them as it
    -- was gives the invariant no key. NULL: every column (the query reads
    -- a row whole, or a system column).
    read_columns   text[],
    PRIMARY KEY (invariant, relation)
);
SELECT pgconsistency._install_comment('pgconsistency.invariant_key_source',
  'How rows of the tables an invariant reads map to its keys (define_invariant(keys => ...))');

-- The capture: one source per (table, key expression) that an invariant in
-- incremental mode needs. The capture triggers on the table (see
-- _install_capture) write the keys of the rows each statement changed into
-- captured_key, in the writer's transaction; a refresh moves them to the
-- pending keys of each invariant in incremental mode (_dispatch_captured_keys),
-- and an incremental refresh re-checks its pending keys only.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_source (
    id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relation       text NOT NULL,
    key_expression text NOT NULL,
    CONSTRAINT capture_source_unique UNIQUE (relation, key_expression)
);
SELECT pgconsistency._install_comment('pgconsistency.capture_source',
  'Tables and key expressions the capture triggers record changed keys of');
-- UNLOGGED: the writers pay no WAL for the capture. A crash empties them
-- (and a promoted standby has them empty): capture_epoch, empty then too,
-- tells the next refresh, which reconciles every invariant in incremental
-- mode. No unique index: two writers of the same key never wait for each
-- other here; a refresh reads the keys deduplicated.
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.captured_key (
    source       integer NOT NULL,
    key          text    NOT NULL,
    -- A key of an UPDATE (0.7.5): for the invariants whose read_columns
    -- are these, whose values changed in a row of the key. NULL: for every
    -- invariant of the source (an INSERT, a DELETE, an UPDATE of a source
    -- some invariant reads whole).
    read_columns text[]
);
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.pending_key (
    invariant text NOT NULL,
    key       text NOT NULL
);
SELECT pgconsistency._install_index('pending_key_invariant',
  'CREATE INDEX pending_key_invariant ON pgconsistency.pending_key (invariant)');
CREATE UNLOGGED TABLE IF NOT EXISTS pgconsistency.capture_epoch (
    singleton  boolean     PRIMARY KEY DEFAULT true CONSTRAINT capture_epoch_one_row CHECK (singleton),
    started_at timestamptz NOT NULL
);
SELECT pgconsistency._install_comment('pgconsistency.captured_key',
  'Keys of rows changed by writers, by capture source; moved to pending_key by each refresh');
SELECT pgconsistency._install_comment('pgconsistency.pending_key',
  'Keys an invariant in incremental mode re-checks at its next refresh');
SELECT pgconsistency._install_comment('pgconsistency.capture_epoch',
  'One row while the unlogged capture tables are intact; empty after a crash or a failover');
-- What bypassed the capture (a TRUNCATE of a captured table), written by the
-- capture triggers; the next refresh turns it into a reconcile of the
-- invariants that read the table.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_gap (
    relation text        NOT NULL,
    reason   text        NOT NULL,
    at       timestamptz NOT NULL
);
SELECT pgconsistency._install_comment('pgconsistency.capture_gap',
  'Writes the capture could not record (TRUNCATE); the next refresh reconciles what they touched');
-- How the writes to the tables of the invariants in incremental mode are
-- captured, for the whole database (0.7.0): 'trigger', capture triggers in
-- the writers' own transactions (the default, which works everywhere), or
-- 'wal', the refresh loop reads the keys of changed rows from the WAL by
-- logical decoding through a replication slot (nothing in the writers'
-- transactions; set_capture, capture_wal in 07_wal_capture.sql). One row.
CREATE TABLE IF NOT EXISTS pgconsistency.capture (
    singleton        boolean     PRIMARY KEY DEFAULT true CONSTRAINT capture_one_row CHECK (singleton),
    method           text        NOT NULL DEFAULT 'trigger' CONSTRAINT capture_method_valid CHECK (method IN ('trigger', 'wal')),
    -- The logical replication slot of the WAL capture (slot names are the
    -- server's, not the database's: one per database).
    slot_name        text,
    -- The keys of every change the WAL holds before this position are in
    -- captured_key (committed): the next read moves the slot here, never
    -- further. NULL: nothing read since the slot was created.
    wal_position     pg_lsn,
    read_at          timestamptz,
    read_changes     bigint,
    slot_created_at  timestamptz,
    -- Why the slot was last created again (dropped, invalidated, missing
    -- after a failover), and when: each time a reconcile of every
    -- invariant in incremental mode.
    slot_lost_reason text,
    slot_lost_at     timestamptz,
    -- The statement a read runs (_wal_read_statement), built at the first
    -- read and kept for the next ones (0.7.5: building it reads the
    -- catalog for every column it compares, tens of milliseconds), headed
    -- by the oids of the tables it was built for; _install_capture empties
    -- it whenever the capture sources, or the columns their invariants
    -- read, may have changed.
    read_statement   text,
    -- Who read the slot last (0.7.7): 'sql', capture_wal in the refresh
    -- loop, or 'stream', the receiver's replication connection
    -- (capture_wal_stream).
    read_by          text
);
INSERT INTO pgconsistency.capture (singleton)
SELECT true WHERE NOT EXISTS (SELECT 1 FROM pgconsistency.capture);
SELECT pgconsistency._install_comment('pgconsistency.capture',
  'How writes are captured for incremental refresh (trigger or wal), and the state of the WAL capture''s slot');
-- One row per invariant in incremental mode: since when its keys are
-- captured, and why its next refresh must be a full one (a reconcile)
-- rather than an incremental one: NULL when nothing says so.
CREATE TABLE IF NOT EXISTS pgconsistency.capture_state (
    invariant        text        PRIMARY KEY REFERENCES pgconsistency.invariant (name) ON DELETE CASCADE ON UPDATE CASCADE,
    since            timestamptz NOT NULL,
    reconcile_reason text
);
SELECT pgconsistency._install_comment('pgconsistency.capture_state',
  'Invariants in incremental mode: capture start, and why the next refresh must reconcile');

-- Refresh requests, e.g. from a deploy pipeline: "refresh everything once the
-- deployment has settled". At most one request is pending; asking again
-- during the delay pushes the due time back (the deployment is not settled).
CREATE TABLE IF NOT EXISTS pgconsistency.refresh_request (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_requested_at timestamptz NOT NULL,
    requested_at timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    requests     integer     NOT NULL DEFAULT 1,
    reason       text,
    -- set by the refresh that runs it: a request runs once
    claimed_at   timestamptz
);
SELECT pgconsistency._install_index('refresh_request_one_pending',
  'CREATE UNIQUE INDEX refresh_request_one_pending ON pgconsistency.refresh_request ((true)) WHERE claimed_at IS NULL');
SELECT pgconsistency._install_comment('pgconsistency.refresh_request',
  'Requests for a refresh of every invariant after a delay; written by pgconsistency.request_refresh()');

-- The last value seen of the deploy marker (a query the receiver watches, such
-- as SELECT max(version) FROM schema_migrations). One row.
CREATE TABLE IF NOT EXISTS pgconsistency.deploy_marker (
    singleton  boolean     PRIMARY KEY DEFAULT true CONSTRAINT deploy_marker_one_row CHECK (singleton),
    value      text,
    seen_at    timestamptz NOT NULL,
    changed_at timestamptz
);
SELECT pgconsistency._install_comment('pgconsistency.deploy_marker',
  'Last seen value of the deploy marker; written by pgconsistency.observe_deploy_marker()');


-- Deployments (0.6.0): each value of the deploy marker observed, the first
-- (the baseline) included, with when it changed. New anomalies record the
-- latest one (anomaly.deployment_id); pgconsistency.deployment_summary counts
-- them per deployment and invariant. Written by observe_deploy_marker().
CREATE TABLE IF NOT EXISTS pgconsistency.deployment (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    marker     text,
    changed_at timestamptz NOT NULL
);
SELECT pgconsistency._install_comment('pgconsistency.deployment',
  'Deployments: each deploy marker value seen and when it changed; written by pgconsistency.observe_deploy_marker()');
-- An install upgraded from before 0.6.0 starts its history with the marker it
-- has (once: the table is empty only then).
INSERT INTO pgconsistency.deployment (marker, changed_at)
SELECT m.value, coalesce(m.changed_at, m.seen_at) FROM pgconsistency.deploy_marker m
 WHERE NOT EXISTS (SELECT 1 FROM pgconsistency.deployment);

-- _work_table: a temporary table of the session that a step fills and reads
-- in one transaction (a refresh's rows, the keys a dispatch moves): made at
-- its first use in the session (not per use, which would write the catalog
-- each time), and emptied before every use, by DELETE, which leaves its
-- file alone, or by TRUNCATE once the table and its indexes hold more than
-- 8 MB (no vacuum runs on a temporary table, so what a DELETE leaves is
-- bounded that way; a mass incident's rows are truncated at the next use).
-- Its rows stay in the session until then. Not ON COMMIT DELETE ROWS
-- (before 0.7.3): PostgreSQL then truncates the file of every such table at
-- each commit of a transaction that used a temporary table, about 1 ms a
-- commit here, paid by every refresh.
CREATE OR REPLACE FUNCTION pgconsistency._work_table(name text, columns text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_rel regclass := pg_catalog.to_regclass('pg_temp.' || pg_catalog.quote_ident(name));
BEGIN
    IF v_rel IS NULL THEN
        EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE %I (%s)', name, columns);
    ELSIF pg_catalog.pg_total_relation_size(v_rel) > 8 * 1024 * 1024 THEN
        EXECUTE pg_catalog.format('TRUNCATE pg_temp.%I', name);
    ELSE
        EXECUTE pg_catalog.format('DELETE FROM pg_temp.%I', name);
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgconsistency._work_table(text, text) IS
  'Internal: a temporary table of the session for one step''s rows, made once and emptied before each use';
