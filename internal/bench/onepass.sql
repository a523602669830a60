-- One pass for the five checks over the block tables (dataset_key_blocks_missing,
-- dataset_seed_missing, dataset_seed_not_first, dataset_chain_gap,
-- dataset_head_ref_mismatch): one aggregate per dataset over key and data
-- blocks together, merged in primary-key order, giving for each check the
-- datasets to look at (a superset of its anomalies; the check's own query,
-- restricted to them, gives its rows). make bench measures it side by side
-- with the five queries run one by one (BENCHMARKS.md, "One pass"): it is
-- not what sql/dataset_invariants.sql does, because it is not faster.
SELECT v.invariant, e.dataset_id::text AS key
  FROM public.dataset_entries e
  LEFT JOIN (SELECT b.dataset_id,
                    count(*) FILTER (WHERE b.is_key) AS key_blocks,
                    bool_or(b.is_key AND b.event_type = 'Seed') AS has_seed,
                    bool_or(b.is_key AND b.event_type = 'Seed' AND b.sequence_number = 0) AS seed_at_0,
                    bool_or(b.is_key AND b.event_type = 'Seed' AND b.sequence_number <> 0) AS seed_elsewhere,
                    count(*) FILTER (WHERE b.block_ref_name = 'head') AS head_blocks,
                    count(DISTINCT b.sequence_number) FILTER (WHERE b.block_ref_name = 'head') AS head_numbers,
                    min(b.sequence_number) FILTER (WHERE b.block_ref_name = 'head') AS head_min,
                    max(b.sequence_number) FILTER (WHERE b.block_ref_name = 'head') AS head_max,
                    (pg_catalog.array_agg(b.block_hash_bin ORDER BY b.sequence_number DESC)
                        FILTER (WHERE b.block_ref_name = 'head'))[1] AS last_hash
               FROM (SELECT k.dataset_id, k.block_ref_name, k.sequence_number, k.event_type::text AS event_type,
                            k.block_hash_bin, true AS is_key
                       FROM public.dataset_key_blocks k
                     UNION ALL
                     SELECT d.dataset_id, d.block_ref_name, d.sequence_number, NULL, d.block_hash_bin, false
                       FROM public.dataset_data_blocks d) b
              GROUP BY b.dataset_id) a ON a.dataset_id = e.dataset_id
  LEFT JOIN (SELECT r.dataset_id, pg_catalog.array_agg(r.block_hash_bin) AS head_hashes
               FROM public.dataset_references r WHERE r.block_ref_name = 'head'
              GROUP BY r.dataset_id) h ON h.dataset_id = e.dataset_id
 CROSS JOIN LATERAL (VALUES
        ('dataset_key_blocks_missing', coalesce(a.key_blocks, 0) = 0),
        ('dataset_seed_missing', a.key_blocks > 0 AND NOT a.has_seed),
        ('dataset_seed_not_first', a.has_seed AND (NOT a.seed_at_0 OR a.seed_elsewhere)),
        ('dataset_chain_gap', a.head_blocks > 0
                              AND (a.head_min <> 0 OR a.head_max <> a.head_blocks - 1 OR a.head_numbers <> a.head_blocks)),
        ('dataset_head_ref_mismatch', a.head_blocks > 0 AND a.last_hash <> ANY (h.head_hashes))
       ) AS v(invariant, hit)
 WHERE v.hit
