-- pgbench script of make bench: the application's write path, one new
-- dataset per transaction with its head reference, statistics and five key
-- blocks, as the service writes them. Complete datasets: the load adds no
-- anomaly.
SELECT nextval('public.bench_write_seq') AS n \gset
BEGIN;
INSERT INTO public.dataset_entries (dataset_id, owner_id, owner_name, dataset_name, created_at, kind)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'did:odf:fed03' || lpad(to_hex(:n / 10), 64, '0'),
        'writer' || (:n / 10), 'written.' || :n, now(), 'root');
INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', 'f1620' || md5('w' || :n) || md5(:n || 'w'));
INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, last_pulled, num_records, data_size, checkpoints_size)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', now(), 0, 0, 0);
INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash, event_payload)
SELECT 'did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', ev::public.metadata_event_type, seq,
       'f1620' || md5('w' || :n || '/' || seq) || md5(seq || '/w' || :n),
       jsonb_build_object('kind', ev, 'dataset', 'written.' || :n, 'note', repeat('x', 40))
  FROM (VALUES (0, 'Seed'), (1, 'SetPollingSource'), (2, 'SetDataSchema'), (3, 'SetInfo'), (4, 'SetLicense')) AS v(seq, ev);
END;
