-- pgbench script of make bench: the service's other write, on today's schema
-- (testdata/schema.sql), beside write_load.sql (a new dataset): a
-- block appended to an existing dataset of generate.sql, its head moved to
-- it, its statistics updated. Run with -D maxq=<scale / 1000 - 1>.
-- The dataset is i = q * 1000 + r with r in 14..99: never one of
-- generate.sql's anomalies (r in 1..13) nor one that BenchmarkIncremental's
-- rounds change (r from 100 on), so the load adds no anomaly and resolves
-- none: the counts stay checkable. Its chain is whole (0..top, the highest a
-- data block), so the new block goes at the highest data block + 1 and the
-- head holds its hash. The entry is locked first, in a statement of its own,
-- so that two clients appending to the same dataset take turns (the INSERT
-- then reads the other's block: a new snapshot per statement).
\set i random(0, :maxq) * 1000 + random(14, 99)
BEGIN;
SELECT 1 FROM public.dataset_entries WHERE dataset_id = 'did:odf:fed01' || lpad(to_hex(:i), 64, '0') FOR UPDATE;
INSERT INTO public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT e.dataset_id, 'head', CASE e.kind WHEN 'derivative' THEN 'ExecuteTransform' ELSE 'AddData' END::public.metadata_event_type,
       t.s + 1, sha256(convert_to('appended:' || e.dataset_id || ':' || (t.s + 1), 'UTF8')),
       int8send(t.s + 1) || t.hash
       || convert_to('{"kind":"AddData","dataset":"' || :i || '","note":"' || repeat('x', 40) || '"}', 'UTF8')
  FROM public.dataset_entries e,
       LATERAL (SELECT d.sequence_number, d.block_hash_bin FROM public.dataset_data_blocks d
                 WHERE d.dataset_id = e.dataset_id AND d.block_ref_name = 'head'
                 ORDER BY d.sequence_number DESC LIMIT 1) AS t(s, hash)
 WHERE e.dataset_id = 'did:odf:fed01' || lpad(to_hex(:i), 64, '0');
UPDATE public.dataset_references r
   SET block_hash_bin = (SELECT d.block_hash_bin FROM public.dataset_data_blocks d
                          WHERE d.dataset_id = r.dataset_id AND d.block_ref_name = 'head'
                          ORDER BY d.sequence_number DESC LIMIT 1)
 WHERE r.dataset_id = 'did:odf:fed01' || lpad(to_hex(:i), 64, '0') AND r.block_ref_name = 'head';
UPDATE public.dataset_statistics s
   SET last_pulled = now(), num_records = s.num_records + 1000, data_size = s.data_size + 65536,
       checkpoints_size = s.checkpoints_size + 4096
 WHERE s.dataset_id = 'did:odf:fed01' || lpad(to_hex(:i), 64, '0') AND s.block_ref_name = 'head';
END;
