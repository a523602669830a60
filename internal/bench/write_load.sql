-- pgbench script of make bench: the application's write path on today's
-- schema (testdata/schema.sql), one new complete dataset per
-- transaction, as the service writes it: its owner's account (one per 10
-- datasets; the first of the 10 to get there creates it), the entry, the
-- head reference (to the highest block), statistics, key blocks Seed@0 and
-- 4 others, then 1 + n % 8 data blocks at 5.. (as generate.sql). Complete
-- datasets, an owner that exists, ref head only: the load adds no anomaly.
-- ON CONFLICT DO NOTHING waits for a concurrent insert of the same account
-- to commit, so no dataset is ever visible before its owner.
SELECT nextval('public.bench_write_seq') AS n \gset
\set top 5 + :n % 8
BEGIN;
INSERT INTO public.accounts (id, account_name, email, display_name, account_type, registered_at, provider, provider_identity_key)
VALUES ('did:odf:fed03' || lpad(to_hex(1000000000 + :n / 10), 64, '0'), 'writer' || (:n / 10),
        'writer' || (:n / 10) || '@example.com', 'Writer ' || (:n / 10), 'user', now(), 'password', 'writer' || (:n / 10))
ON CONFLICT DO NOTHING;
INSERT INTO public.dataset_entries (dataset_id, owner_id, dataset_name, created_at, kind, owner_name)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'did:odf:fed03' || lpad(to_hex(1000000000 + :n / 10), 64, '0'),
        'written.' || :n, now(), 'root', 'writer' || (:n / 10));
INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash_bin)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', sha256(int8send(-:n) || int8send(:top)));
INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, last_pulled, num_records, data_size, checkpoints_size,
                                       num_object_links, object_links_size)
VALUES ('did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', now(), 0, 0, 0, 0, 0);
INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT 'did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', ev::public.metadata_event_type, seq,
       sha256(int8send(-:n) || int8send(seq)),
       int8send(seq) || CASE WHEN seq = 0 THEN '\x'::bytea ELSE sha256(int8send(-:n) || int8send(seq - 1)) END
       || convert_to('{"kind":"' || ev || '","dataset":"written.' || :n || '","schema":"arrow:' || md5(:n::text)
                     || '","note":"' || repeat('x', 20) || '"}', 'UTF8')
  FROM (VALUES (0::bigint, 'Seed'), (1, 'SetPollingSource'), (2, 'SetDataSchema'), (3, 'SetInfo'), (4, 'SetLicense')) AS v(seq, ev);
INSERT INTO public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT 'did:odf:fed02' || lpad(to_hex(:n), 64, '0'), 'head', 'AddData', seq,
       sha256(int8send(-:n) || int8send(seq)),
       int8send(seq) || sha256(int8send(-:n) || int8send(seq - 1))
       || convert_to('{"kind":"AddData","dataset":"written.' || :n || '","schema":"arrow:' || md5(:n::text)
                     || '","note":"' || repeat('x', 20) || '"}', 'UTF8')
  FROM generate_series(5::bigint, :top) AS seq;
END;
