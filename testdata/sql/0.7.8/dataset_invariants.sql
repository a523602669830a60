-- pgconsistency dataset invariant pack.
--
-- Every dataset in public.dataset_entries must
--   * have exactly one 'head' row in public.dataset_references,
--   * have exactly one row in public.dataset_statistics per ref,
--   * have at least one row in public.dataset_key_blocks, whose Seed event is
--     present and at sequence number 0,
--   * (today's schema) have a metadata chain - its key and data blocks of ref
--     head - numbered exactly 0..N, each number once, and a head reference
--     that holds the hash of block N,
--   * (today's schema) use no ref name but 'head' anywhere, since the service
--     writes only that one,
--   * (where public.accounts exists) have an owner that exists;
-- every derivative dataset must be the downstream side of at least one edge
-- in public.dataset_dependencies, and no root dataset may be.
--
-- One query per invariant (define_invariant), one row per anomaly: a dataset
-- that breaks the invariant, keyed by dataset_id; each refresh keeps the rows
-- as the invariant's open anomalies, shown by the view pgconsistency.<name>.
-- Each query reads each table once: NOT EXISTS becomes an anti
-- join, GROUP BY a single aggregate pass; nothing is correlated per row
-- (except lookups by a unique index for the details of an anomaly).
-- The queries do not rely on the application's unique indexes: deployments
-- drift (a failed migration, a dropped index) and that is what we watch for.
-- The application tables are expected in schema public; edit the "public."
-- prefixes below if yours live elsewhere.
--
-- Two shapes of the schema are supported: the one at the time of the
-- incident (testdata/legacy/schema.sql: no data blocks, text hashes) and today's
-- (testdata/schema.sql: dataset_data_blocks, bytea hashes, accounts).
-- An invariant whose tables are missing is skipped with a NOTICE
-- (pgconsistency.requires); re-running install.sql after the migration that
-- adds them creates it. The chain, head-hash and ref-name checks need
-- dataset_data_blocks: without the data blocks a chain always has gaps, and
-- the older service wrote other ref names.
--
-- Plans (make bench, BENCHMARKS.md): the "no row in table X" checks run as
-- merge anti joins over the indexes on dataset_id that the service has
-- (dataset_entries_pkey, idx_dataset_references, idx_dataset_statistics,
-- idx_dataset_dependencies_downstream_dataset_id, the key blocks' primary
-- key), 3-4x faster at 1M datasets than the hash anti joins the planner
-- prefers: hence settings => enable_hashjoin off on those invariants.
-- Incremental re-checks (settings -> 'incremental') read a few datasets by
-- key: nested loops over the dataset_id indexes, not hash or merge joins,
-- which read dataset_entries (or an index of it) whole for a few keys.
-- keys => maps each table's rows to datasets for incremental refresh.
-- owner => and runbook_url => are defaults: every invariant of this pack is
-- owned by 'data-platform' (the team Alertmanager routes its alerts to, see
-- config/alertmanager.yml) and links to the dataset section of
-- docs/runbook.md, unless set_owner() (or an UPDATE) gave it another
-- owner or runbook: re-running the pack keeps those.
--
-- Requires the framework (sql/framework/). Idempotent: an unchanged query
-- keeps its view.

SELECT pgconsistency.define_invariant(
    name        => 'dataset_head_ref_missing',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has no head row in dataset_references',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_references r
                            WHERE r.dataset_id = e.dataset_id AND r.block_ref_name = 'head')
    $q$,
    settings    => '{"enable_hashjoin": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_references": "r.dataset_id::text"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_head_ref_duplicated',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has more than one head row in dataset_references',
    query       => $q$
        SELECT r.dataset_id::text AS key,
               count(*) AS head_refs
          FROM public.dataset_references r
         WHERE r.block_ref_name = 'head'
           AND EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = r.dataset_id)
         GROUP BY r.dataset_id
        HAVING count(*) > 1
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_references": "r.dataset_id::text"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_statistics_missing',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has no row in dataset_statistics',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_statistics s WHERE s.dataset_id = e.dataset_id)
    $q$,
    settings    => '{"enable_hashjoin": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_statistics": "r.dataset_id::text"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_statistics_duplicated',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has more than one dataset_statistics row for the same ref',
    query       => $q$
        SELECT d.dataset_id::text AS key,
               count(*) AS duplicated_refs,
               sum(d.n) AS rows
          FROM (SELECT s.dataset_id, s.block_ref_name, count(*) AS n
                  FROM public.dataset_statistics s
                 GROUP BY s.dataset_id, s.block_ref_name
                HAVING count(*) > 1) d
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = d.dataset_id)
         GROUP BY d.dataset_id
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_statistics": "r.dataset_id::text"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_key_blocks_missing',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has no row at all in dataset_key_blocks',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_key_blocks k WHERE k.dataset_id = e.dataset_id)
    $q$,
    settings    => '{"enable_hashjoin": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text"}');

-- The incident's shape: key blocks left with only AddPushSource.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_seed_missing',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has key blocks but none of them is a Seed event',
    query       => $q$
        SELECT k.dataset_id::text AS key,
               count(*) AS key_blocks,
               min(k.sequence_number) AS min_sequence_number
          FROM public.dataset_key_blocks k
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = k.dataset_id)
         GROUP BY k.dataset_id
        HAVING NOT bool_or(k.event_type = 'Seed')
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text"}');

-- Disjoint from dataset_seed_missing: requires at least one Seed.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_seed_not_first',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has a Seed event, but none at sequence number 0 or one at another sequence number',
    query       => $q$
        SELECT k.dataset_id::text AS key,
               count(*) FILTER (WHERE k.event_type = 'Seed') AS seeds,
               min(k.sequence_number) FILTER (WHERE k.event_type = 'Seed') AS min_seed_sequence_number,
               max(k.sequence_number) FILTER (WHERE k.event_type = 'Seed') AS max_seed_sequence_number
          FROM public.dataset_key_blocks k
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = k.dataset_id)
         GROUP BY k.dataset_id
        HAVING bool_or(k.event_type = 'Seed')
           AND (NOT bool_or(k.event_type = 'Seed' AND k.sequence_number = 0)
                OR bool_or(k.event_type = 'Seed' AND k.sequence_number <> 0))
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text"}');

-- Edges whose upstream is unknown are allowed: the table has no foreign keys.
SELECT pgconsistency.define_invariant(
    name        => 'derivative_dependencies_missing',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Derivative dataset is nobody''s downstream in dataset_dependencies',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE e.kind = 'derivative'
           AND NOT EXISTS (SELECT 1 FROM public.dataset_dependencies d
                            WHERE d.downstream_dataset_id = e.dataset_id)
    $q$,
    settings    => '{"enable_hashjoin": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_dependencies": "r.downstream_dataset_id::text"}');

-- Roots read no other dataset: an upstream edge to a root is a dataset whose
-- kind changed, or an edge written for the wrong dataset.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_root_has_upstream',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Root dataset is the downstream side of an edge in dataset_dependencies',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name,
               count(*) AS upstream_edges,
               min(d.upstream_dataset_id)::text AS first_upstream_dataset_id
          FROM public.dataset_entries e
          JOIN public.dataset_dependencies d ON d.downstream_dataset_id = e.dataset_id
         WHERE e.kind = 'root'
         GROUP BY e.dataset_id, e.owner_name, e.dataset_name
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_dependencies": "r.downstream_dataset_id::text"}')
 WHERE pgconsistency.requires('dataset_root_has_upstream', 'public.dataset_entries', 'public.dataset_dependencies');

-- dataset_entries.owner_id has no foreign key to accounts (it was dropped
-- with the cross-domain cascades): nothing stops an account's deletion from
-- leaving its datasets without an owner.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_owner_missing',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset owner_id is not an id in accounts',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_id::text AS owner_id,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.accounts a WHERE a.id = e.owner_id)
    $q$,
    settings    => '{"enable_hashjoin": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.accounts": {"capture": "r.id::text", "keys": "SELECT e.dataset_id::text FROM public.dataset_entries e WHERE e.owner_id = ANY ($1)"}}')
 WHERE pgconsistency.requires('dataset_owner_missing', 'public.dataset_entries', 'public.accounts');

-- The metadata chain: key and data blocks of ref head together are numbered
-- 0..N, each number once. A lost block anywhere (the incident lost Seed and
-- SetDataSchema), or a block cached twice (once as key, once as data),
-- breaks it. Details: the first number missing and the first repeated (NULL
-- when none), the highest number, and the number of blocks. Plan
-- (BENCHMARKS.md): the ref filter stands outside the UNION ALL, so that
-- PostgreSQL merges the two primary-key orders (dataset_id, block_ref_name,
-- sequence_number) into the window's order instead of sorting both tables
-- (on disk at 1M datasets: 15 s before, 9 s since). Blocks of datasets
-- without an entry are left out after grouping, for the broken chains only
-- (one lookup each), not joined block by block with dataset_entries: at
-- 100k datasets 1.67 s -> 0.78 s in full, 52 -> 24 ms for 900 keys.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_chain_gap',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset blocks (key and data, ref head) are not numbered exactly 0..N, each once',
    query       => $q$
        SELECT c.dataset_id::text AS key,
               min(c.sequence_number - c.step + 1) FILTER (WHERE c.step > 1) AS first_missing_sequence_number,
               min(c.sequence_number) FILTER (WHERE c.step = 0) AS first_repeated_sequence_number,
               max(c.sequence_number) AS max_sequence_number,
               count(*) AS blocks
          FROM (SELECT b.dataset_id, b.sequence_number,
                       b.sequence_number - coalesce(lag(b.sequence_number) OVER w, -1) AS step
                  FROM (SELECT k.dataset_id, k.block_ref_name, k.sequence_number FROM public.dataset_key_blocks k
                        UNION ALL
                        SELECT d.dataset_id, d.block_ref_name, d.sequence_number FROM public.dataset_data_blocks d) b
                 WHERE b.block_ref_name = 'head'
                WINDOW w AS (PARTITION BY b.dataset_id ORDER BY b.sequence_number)) c
         GROUP BY c.dataset_id
        HAVING bool_or(c.step <> 1)
           AND EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = c.dataset_id)
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text", "public.dataset_data_blocks": "r.dataset_id::text"}')
 WHERE pgconsistency.requires('dataset_chain_gap', 'public.dataset_entries', 'public.dataset_key_blocks', 'public.dataset_data_blocks');

-- The head reference holds the hash of the highest-numbered block: moving
-- the reference and indexing the new blocks happen in one transaction.
-- Details, in the service's hex form: the reference's hash, the hash of the
-- highest block and its number, and the number of the block the reference
-- points at (NULL: no block of the dataset has that hash). A dataset with
-- two head references is compared on each (and is dataset_head_ref_duplicated);
-- one with two blocks of the highest number (dataset_chain_gap) matches if
-- either has the reference's hash. Plan: the last block of each dataset
-- comes from the two primary keys read backwards and merged (no sort), then
-- hash joins (enable_nestloop off: the planner expects a few datasets out of
-- DISTINCT ON, not all of them, and would look each up); the correlated
-- subqueries, and the lookup of the dataset's entry, run for the
-- mismatching datasets only.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_head_ref_mismatch',
    severity    => 'critical',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset head reference does not hold the hash of its highest-numbered block',
    query       => $q$
        SELECT m.dataset_id::text AS key,
               'f1620' || pg_catalog.encode(m.head_ref_hash, 'hex') AS head_ref_hash,
               'f1620' || pg_catalog.encode(m.last_block_hash, 'hex') AS last_block_hash,
               m.last_sequence_number,
               (SELECT min(x.sequence_number)
                  FROM (SELECT k.sequence_number FROM public.dataset_key_blocks k
                         WHERE k.dataset_id = m.dataset_id AND k.block_hash_bin = m.head_ref_hash
                           AND k.block_ref_name = 'head'
                        UNION ALL
                        SELECT d.sequence_number FROM public.dataset_data_blocks d
                         WHERE d.dataset_id = m.dataset_id AND d.block_hash_bin = m.head_ref_hash
                           AND d.block_ref_name = 'head') x) AS head_ref_sequence_number
          FROM (SELECT t.dataset_id, t.sequence_number AS last_sequence_number,
                       (SELECT x.block_hash_bin
                          FROM (SELECT k.block_hash_bin FROM public.dataset_key_blocks k
                                 WHERE k.dataset_id = t.dataset_id AND k.block_ref_name = 'head'
                                   AND k.sequence_number = t.sequence_number
                                UNION ALL
                                SELECT d.block_hash_bin FROM public.dataset_data_blocks d
                                 WHERE d.dataset_id = t.dataset_id AND d.block_ref_name = 'head'
                                   AND d.sequence_number = t.sequence_number) x
                         ORDER BY x.block_hash_bin LIMIT 1) AS last_block_hash,
                       (pg_catalog.array_agg(r.block_hash_bin ORDER BY r.block_hash_bin))[1] AS head_ref_hash
                  FROM (SELECT DISTINCT ON (b.dataset_id) b.dataset_id, b.sequence_number, b.block_hash_bin
                          FROM (SELECT k.dataset_id, k.block_ref_name, k.sequence_number, k.block_hash_bin
                                  FROM public.dataset_key_blocks k
                                UNION ALL
                                SELECT d.dataset_id, d.block_ref_name, d.sequence_number, d.block_hash_bin
                                  FROM public.dataset_data_blocks d) b
                         WHERE b.block_ref_name = 'head'
                         ORDER BY b.dataset_id DESC, b.sequence_number DESC) t
                  JOIN public.dataset_references r ON r.dataset_id = t.dataset_id AND r.block_ref_name = 'head'
                 WHERE r.block_hash_bin IS DISTINCT FROM t.block_hash_bin
                   AND NOT EXISTS (SELECT 1
                                     FROM (SELECT k.block_hash_bin FROM public.dataset_key_blocks k
                                            WHERE k.dataset_id = t.dataset_id AND k.block_ref_name = 'head'
                                              AND k.sequence_number = t.sequence_number
                                           UNION ALL
                                           SELECT d.block_hash_bin FROM public.dataset_data_blocks d
                                            WHERE d.dataset_id = t.dataset_id AND d.block_ref_name = 'head'
                                              AND d.sequence_number = t.sequence_number) x
                                    WHERE x.block_hash_bin = r.block_hash_bin)
                 GROUP BY t.dataset_id, t.sequence_number) m
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = m.dataset_id)
    $q$,
    settings    => '{"enable_nestloop": "off", "incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_references": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text", "public.dataset_data_blocks": "r.dataset_id::text"}')
 WHERE pgconsistency.requires('dataset_head_ref_mismatch', 'public.dataset_entries', 'public.dataset_references',
                              'public.dataset_key_blocks', 'public.dataset_data_blocks');

-- The service writes one ref name, head, and fails on reading any other
-- back. Details: which tables hold other names, which names, how many rows.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_ref_name_unknown',
    severity    => 'warning',
    owner       => 'data-platform',
    runbook_url => 'https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants',
    description => 'Dataset has a row with a ref name other than head (references, statistics, key or data blocks)',
    query       => $q$
        SELECT x.dataset_id::text AS key,
               pg_catalog.string_agg(DISTINCT x.source, ',' ORDER BY x.source) AS tables,
               pg_catalog.string_agg(DISTINCT x.block_ref_name, ',' ORDER BY x.block_ref_name) AS ref_names,
               count(*) AS rows
          FROM (SELECT r.dataset_id, r.block_ref_name::text, 'dataset_references' AS source
                  FROM public.dataset_references r WHERE r.block_ref_name <> 'head'
                UNION ALL
                SELECT s.dataset_id, s.block_ref_name::text, 'dataset_statistics'
                  FROM public.dataset_statistics s WHERE s.block_ref_name <> 'head'
                UNION ALL
                SELECT k.dataset_id, k.block_ref_name::text, 'dataset_key_blocks'
                  FROM public.dataset_key_blocks k WHERE k.block_ref_name <> 'head'
                UNION ALL
                SELECT d.dataset_id, d.block_ref_name::text, 'dataset_data_blocks'
                  FROM public.dataset_data_blocks d WHERE d.block_ref_name <> 'head') x
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = x.dataset_id)
         GROUP BY x.dataset_id
    $q$,
    settings    => '{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}}',
    keys        => '{"public.dataset_entries": "r.dataset_id::text", "public.dataset_references": "r.dataset_id::text", "public.dataset_statistics": "r.dataset_id::text", "public.dataset_key_blocks": "r.dataset_id::text", "public.dataset_data_blocks": "r.dataset_id::text"}')
 WHERE pgconsistency.requires('dataset_ref_name_unknown', 'public.dataset_entries', 'public.dataset_references',
                              'public.dataset_statistics', 'public.dataset_key_blocks', 'public.dataset_data_blocks');
