-- pgconsistency dataset invariant pack.
--
-- Every dataset in public.dataset_entries must
--   * have exactly one 'head' row in public.dataset_references,
--   * have exactly one row in public.dataset_statistics per ref,
--   * have at least one row in public.dataset_key_blocks, whose Seed event is
--     present and at sequence number 0,
-- and every derivative dataset must be the downstream side of at least one
-- edge in public.dataset_dependencies.
--
-- One materialized view per invariant, one row per offending dataset, keyed by
-- dataset_id. Each query reads each table once: NOT EXISTS becomes a hash anti
-- join, GROUP BY a single aggregate pass; nothing is correlated per row.
-- The queries do not rely on the application's unique indexes: deployments
-- drift (a failed migration, a dropped index) and that is what we watch for.
-- The application tables are expected in schema public; edit the "public."
-- prefixes below if yours live elsewhere.
--
-- Plans (make bench, BENCHMARKS.md): the "no row in table X" checks run as
-- merge anti joins over the indexes on dataset_id that the service has
-- (dataset_entries_pkey, idx_dataset_references, idx_dataset_statistics,
-- idx_dataset_dependencies_downstream_dataset_id, the key blocks' primary
-- key), 3-4x faster at 1M datasets than the hash anti joins the planner
-- prefers: hence settings => enable_hashjoin off on those invariants.
--
-- Requires framework.sql. Idempotent: an unchanged query keeps its view.

SELECT pgconsistency.define_invariant(
    name        => 'dataset_head_ref_missing',
    severity    => 'critical',
    description => 'Dataset has no head row in dataset_references',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_references r
                            WHERE r.dataset_id = e.dataset_id AND r.block_ref_name = 'head')
    $q$,
    settings    => '{"enable_hashjoin": "off"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_head_ref_duplicated',
    severity    => 'critical',
    description => 'Dataset has more than one head row in dataset_references',
    query       => $q$
        SELECT r.dataset_id::text AS key,
               count(*) AS head_refs
          FROM public.dataset_references r
         WHERE r.block_ref_name = 'head'
           AND EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = r.dataset_id)
         GROUP BY r.dataset_id
        HAVING count(*) > 1
    $q$);

SELECT pgconsistency.define_invariant(
    name        => 'dataset_statistics_missing',
    severity    => 'warning',
    description => 'Dataset has no row in dataset_statistics',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_statistics s WHERE s.dataset_id = e.dataset_id)
    $q$,
    settings    => '{"enable_hashjoin": "off"}');

SELECT pgconsistency.define_invariant(
    name        => 'dataset_statistics_duplicated',
    severity    => 'warning',
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
    $q$);

SELECT pgconsistency.define_invariant(
    name        => 'dataset_key_blocks_missing',
    severity    => 'critical',
    description => 'Dataset has no row at all in dataset_key_blocks',
    query       => $q$
        SELECT e.dataset_id::text AS key,
               e.owner_name::text AS owner_name,
               e.dataset_name::text AS dataset_name
          FROM public.dataset_entries e
         WHERE NOT EXISTS (SELECT 1 FROM public.dataset_key_blocks k WHERE k.dataset_id = e.dataset_id)
    $q$,
    settings    => '{"enable_hashjoin": "off"}');

-- The incident's shape: key blocks left with only AddPushSource.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_seed_missing',
    severity    => 'critical',
    description => 'Dataset has key blocks but none of them is a Seed event',
    query       => $q$
        SELECT k.dataset_id::text AS key,
               count(*) AS key_blocks,
               min(k.sequence_number) AS min_sequence_number
          FROM public.dataset_key_blocks k
         WHERE EXISTS (SELECT 1 FROM public.dataset_entries e WHERE e.dataset_id = k.dataset_id)
         GROUP BY k.dataset_id
        HAVING NOT bool_or(k.event_type = 'Seed')
    $q$);

-- Disjoint from dataset_seed_missing: requires at least one Seed.
SELECT pgconsistency.define_invariant(
    name        => 'dataset_seed_not_first',
    severity    => 'critical',
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
    $q$);

-- Edges whose upstream is unknown are allowed: the table has no foreign keys.
SELECT pgconsistency.define_invariant(
    name        => 'derivative_dependencies_missing',
    severity    => 'warning',
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
    settings    => '{"enable_hashjoin": "off"}');
