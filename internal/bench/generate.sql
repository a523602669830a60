-- Benchmark data for pgconsistency: the application schema of
-- testdata/schema.sql (the service's schema today) filled at a given
-- scale, with anomalies at known rates. Run with psql -v scale=N on a database
-- holding testdata/schema.sql.
--
-- Shape (per dataset i in 1..:scale), like the service writes it:
--   * ids as in the service: 'did:odf:fed01' + 64 hex digits (77 characters);
--     one owner account per 10 datasets (i / 10), a row in accounts each;
--   * 30% derivative (i % 10 in 0, 1, 2), each with one upstream edge;
--   * one ref name only, 'head' (the only one the service writes; any other
--     is a dataset_ref_name_unknown anomaly): one head reference and one
--     statistics row per dataset;
--   * a full metadata chain in ref head: key blocks Seed@0 and 4 other key
--     events at 1..4, then 1 + i % 8 data blocks (AddData for roots,
--     ExecuteTransform for derivatives) at 5.., 4.5 on average, so the
--     highest block is 5 + i % 8; the head reference holds its hash;
--   * block_hash_bin: 32 bytes (sha256 of i and the sequence number);
--     block_payload: about 150 bytes, a stand-in for the serialized block
--     (sequence number, previous block's hash, event).
-- Anomalies: one dataset in 1,000 per invariant, disjoint, chosen by i % 1000
-- (see expectedAnomalies in bench_test.go), each shaped to break its own
-- invariant only (below).
-- Drift: the unique indexes on references and statistics
-- (idx_dataset_references, idx_dataset_statistics) are created as plain
-- indexes so that the duplicated-* anomalies can exist, the drift those
-- invariants watch for. Every other key and index is as in the schema.

\set ON_ERROR_STOP 1
SET synchronous_commit = off;
SET maintenance_work_mem = '1GB';

-- Keys and indexes are built after the load, as a restore would.
DROP INDEX public.idx_accounts_name, public.idx_accounts_email, public.idx_accounts_provider_identity_key,
           public.idx_dataset_entries_owner_id, public.idx_dataset_entries_owner_id_dataset_name,
           public.idx_dataset_dependencies, public.idx_dataset_dependencies_upstream_dataset_id,
           public.idx_dataset_dependencies_downstream_dataset_id,
           public.idx_dataset_references, public.idx_dataset_statistics,
           public.idx_dataset_key_blocks_latest_event, public.idx_dataset_key_blocks_by_hash,
           public.idx_dataset_data_blocks_latest_event, public.idx_dataset_data_blocks_by_hash;
ALTER TABLE public.dataset_references DROP CONSTRAINT dataset_references_dataset_id_fkey;
ALTER TABLE public.dataset_statistics DROP CONSTRAINT dataset_statistics_dataset_id_fkey;
ALTER TABLE public.dataset_key_blocks DROP CONSTRAINT dataset_key_blocks_dataset_id_fkey,
                                      DROP CONSTRAINT dataset_key_blocks_pkey;
ALTER TABLE public.dataset_data_blocks DROP CONSTRAINT dataset_data_blocks_dataset_id_fkey,
                                       DROP CONSTRAINT dataset_data_blocks_pkey;
ALTER TABLE public.dataset_entries DROP CONSTRAINT dataset_entries_pkey;
ALTER TABLE public.accounts DROP CONSTRAINT accounts_pkey;

CREATE FUNCTION pg_temp.did(i bigint) RETURNS varchar LANGUAGE sql IMMUTABLE
AS $$ SELECT ('did:odf:fed01' || lpad(to_hex(i), 64, '0'))::varchar $$;
CREATE FUNCTION pg_temp.account(a bigint) RETURNS varchar LANGUAGE sql IMMUTABLE
AS $$ SELECT ('did:odf:fed03' || lpad(to_hex(a), 64, '0'))::varchar $$;
-- The 32-byte hash of dataset i's block seq; salt for blocks that must not
-- collide with the chain's own (hashes are unique per dataset and table).
CREATE FUNCTION pg_temp.hash(i bigint, seq bigint, salt text DEFAULT '') RETURNS bytea LANGUAGE sql IMMUTABLE
AS $$ SELECT sha256(int8send(i) || int8send(seq) || convert_to(salt, 'UTF8')) $$;
-- About 150 bytes: sequence number, previous block's hash, the event.
CREATE FUNCTION pg_temp.payload(i bigint, seq bigint, ev text) RETURNS bytea LANGUAGE sql IMMUTABLE
AS $$ SELECT int8send(seq) || CASE WHEN seq = 0 THEN '\x'::bytea ELSE pg_temp.hash(i, seq - 1) END
          || convert_to('{"kind":"' || ev || '","dataset":"' || i || '","schema":"arrow:'
                        || md5(i::text) || '","note":"' || repeat('x', 20) || '"}', 'UTF8') $$;
-- The sequence number of dataset i's highest block.
CREATE FUNCTION pg_temp.top(i bigint) RETURNS bigint LANGUAGE sql IMMUTABLE
AS $$ SELECT 5 + i % 8 $$;

INSERT INTO public.accounts (id, account_name, email, display_name, account_type, avatar_url,
                             registered_at, provider, provider_identity_key)
SELECT pg_temp.account(a), 'account' || a, 'account' || a || '@example.com', 'Account ' || a,
       CASE WHEN a % 5 = 0 THEN 'organization' ELSE 'user' END::public.account_type,
       CASE WHEN a % 2 = 0 THEN 'https://avatars.example.com/u/' || a END,
       timestamptz '2023-06-01 00:00:00+00' + a * interval '1 minute', 'password', 'account' || a
  FROM generate_series(0, :scale / 10) AS a;

INSERT INTO public.dataset_entries (dataset_id, owner_id, dataset_name, created_at, kind, owner_name)
SELECT pg_temp.did(i),
       pg_temp.account(i / 10),
       CASE WHEN i % 10 < 3 THEN 'derived.' ELSE 'ingest.' END || i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
       CASE WHEN i % 10 < 3 THEN 'derivative' ELSE 'root' END::public.dataset_kind,
       'account' || (i / 10)
  FROM generate_series(1, :scale) AS i;

INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash_bin)
SELECT pg_temp.did(i), 'head', pg_temp.hash(i, pg_temp.top(i))
  FROM generate_series(1, :scale) AS i;

INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, last_pulled, num_records, data_size,
                                       checkpoints_size, num_object_links, object_links_size)
SELECT pg_temp.did(i), 'head', timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second',
       1000 * (i % 977), 65536 * (i % 977), 4096 * (i % 13), i % 3, 1024 * (i % 3)
  FROM generate_series(1, :scale) AS i;

INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT pg_temp.did(i), 'head', ev::public.metadata_event_type, seq, pg_temp.hash(i, seq), pg_temp.payload(i, seq, ev)
  FROM generate_series(1, :scale) AS i,
       LATERAL (SELECT * FROM (VALUES (0, 'Seed'), (1, 'SetPollingSource'), (2, 'SetDataSchema'),
                                      (3, 'SetInfo'), (4, 'SetLicense')) AS v(seq, ev) WHERE i % 10 >= 3
                UNION ALL
                SELECT * FROM (VALUES (0, 'Seed'), (1, 'SetTransform'), (2, 'SetDataSchema'),
                                      (3, 'SetInfo'), (4, 'SetVocab')) AS v(seq, ev) WHERE i % 10 < 3) AS b;

INSERT INTO public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT pg_temp.did(i), 'head', ev::public.metadata_event_type, seq, pg_temp.hash(i, seq), pg_temp.payload(i, seq, ev)
  FROM generate_series(1, :scale) AS i,
       LATERAL (SELECT CASE WHEN i % 10 < 3 THEN 'ExecuteTransform' ELSE 'AddData' END) AS k(ev),
       LATERAL generate_series(5, pg_temp.top(i)) AS seq;

-- Each derivative reads the root dataset three ids later (or, past the end,
-- a dataset of another node: edges need no foreign key).
INSERT INTO public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id)
SELECT pg_temp.did(i + 3), pg_temp.did(i)
  FROM generate_series(1, :scale) AS i
 WHERE i % 10 < 3;

-- Keys and indexes, as testdata/schema.sql has them, but for the two
-- unique indexes that would forbid the duplicated-* anomalies.
ALTER TABLE public.accounts ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX idx_accounts_name ON public.accounts (LOWER(account_name));
CREATE UNIQUE INDEX idx_accounts_email ON public.accounts (LOWER(email));
CREATE UNIQUE INDEX idx_accounts_provider_identity_key ON public.accounts (provider_identity_key);
ALTER TABLE public.dataset_entries ADD PRIMARY KEY (dataset_id);
CREATE INDEX idx_dataset_entries_owner_id ON public.dataset_entries (owner_id);
CREATE UNIQUE INDEX idx_dataset_entries_owner_id_dataset_name ON public.dataset_entries (owner_id, LOWER(dataset_name));
CREATE UNIQUE INDEX idx_dataset_dependencies ON public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id);
CREATE INDEX idx_dataset_dependencies_upstream_dataset_id ON public.dataset_dependencies (upstream_dataset_id);
CREATE INDEX idx_dataset_dependencies_downstream_dataset_id ON public.dataset_dependencies (downstream_dataset_id);
CREATE INDEX idx_dataset_references ON public.dataset_references (dataset_id, block_ref_name);
CREATE INDEX idx_dataset_statistics ON public.dataset_statistics (dataset_id, block_ref_name);
ALTER TABLE public.dataset_key_blocks ADD PRIMARY KEY (dataset_id, block_ref_name, sequence_number);
CREATE INDEX idx_dataset_key_blocks_latest_event
    ON public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);
CREATE UNIQUE INDEX idx_dataset_key_blocks_by_hash ON public.dataset_key_blocks (dataset_id, block_hash_bin);
ALTER TABLE public.dataset_data_blocks ADD PRIMARY KEY (dataset_id, block_ref_name, sequence_number);
CREATE INDEX idx_dataset_data_blocks_latest_event
    ON public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);
CREATE UNIQUE INDEX idx_dataset_data_blocks_by_hash ON public.dataset_data_blocks (dataset_id, block_hash_bin);
ALTER TABLE public.dataset_references ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;
ALTER TABLE public.dataset_statistics ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;
ALTER TABLE public.dataset_key_blocks ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;
ALTER TABLE public.dataset_data_blocks ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;

-- Anomalies, one dataset in 1,000 per invariant (i % 1000 = 1..13), each
-- shaped so that it is an anomaly of its own invariant only.
CREATE TEMPORARY TABLE broken AS
SELECT i, i % 1000 AS kind, pg_temp.did(i) AS dataset_id
  FROM generate_series(1, :scale) AS i
 WHERE i % 1000 BETWEEN 1 AND 13;
-- 1 dataset_head_ref_missing: the head reference is gone.
DELETE FROM public.dataset_references r USING broken b
 WHERE b.kind = 1 AND r.dataset_id = b.dataset_id AND r.block_ref_name = 'head';
-- 2 dataset_head_ref_duplicated: a second head reference, to the same (the
-- right) block, so no dataset_head_ref_mismatch.
INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash_bin)
SELECT b.dataset_id, 'head', pg_temp.hash(b.i, pg_temp.top(b.i)) FROM broken b WHERE b.kind = 2;
-- 3 dataset_statistics_missing: no statistics.
DELETE FROM public.dataset_statistics s USING broken b
 WHERE b.kind = 3 AND s.dataset_id = b.dataset_id;
-- 4 dataset_statistics_duplicated: statistics of head twice.
INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size)
SELECT b.dataset_id, 'head', 0, 0, 0 FROM broken b WHERE b.kind = 4;
-- 5 dataset_key_blocks_missing: no key blocks, and the data blocks gone too
-- (data blocks left alone would be a chain starting at 5: a chain gap).
DELETE FROM public.dataset_key_blocks k USING broken b
 WHERE b.kind = 5 AND k.dataset_id = b.dataset_id;
DELETE FROM public.dataset_data_blocks d USING broken b
 WHERE b.kind = 5 AND d.dataset_id = b.dataset_id;
-- 6 dataset_seed_missing: block 0 is no Seed any more (its event type
-- rewritten); deleting it would also be a chain gap.
UPDATE public.dataset_key_blocks k SET event_type = 'AddPushSource' FROM broken b
 WHERE b.kind = 6 AND k.dataset_id = b.dataset_id AND k.event_type = 'Seed';
-- 7 dataset_seed_not_first: Seed and block 1 swapped their event types: the
-- Seed is at 1, the chain unchanged.
UPDATE public.dataset_key_blocks k
   SET event_type = CASE k.sequence_number WHEN 0 THEN 'SetPollingSource' ELSE 'Seed' END::public.metadata_event_type
  FROM broken b
 WHERE b.kind = 7 AND k.dataset_id = b.dataset_id AND k.sequence_number IN (0, 1);
-- 8 dataset_root_has_upstream (i % 10 = 8: a root): an upstream edge.
INSERT INTO public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id)
SELECT pg_temp.did(b.i + 1), b.dataset_id FROM broken b WHERE b.kind = 8;
-- 9 dataset_chain_gap, three shapes in turn (highest block, head and Seed
-- untouched): a key block lost (SetDataSchema@2), a data block lost (5, of
-- 5..6: i % 8 = 1 here), or sequence number 5 twice (a SetInfo key block
-- next to data block 5).
DELETE FROM public.dataset_key_blocks k USING broken b
 WHERE b.kind = 9 AND (b.i / 1000) % 3 = 0 AND k.dataset_id = b.dataset_id AND k.sequence_number = 2;
DELETE FROM public.dataset_data_blocks d USING broken b
 WHERE b.kind = 9 AND (b.i / 1000) % 3 = 1 AND d.dataset_id = b.dataset_id AND d.sequence_number = 5;
INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT b.dataset_id, 'head', 'SetInfo', 5, pg_temp.hash(b.i, 5, 'duplicate'), pg_temp.payload(b.i, 5, 'SetInfo')
  FROM broken b WHERE b.kind = 9 AND (b.i / 1000) % 3 = 2;
-- 10 derivative_dependencies_missing (i % 10 = 0: a derivative): its edge
-- is gone.
DELETE FROM public.dataset_dependencies d USING broken b
 WHERE b.kind = 10 AND d.downstream_dataset_id = b.dataset_id;
-- 11 dataset_head_ref_mismatch: the head still holds the hash of the block
-- before the highest.
UPDATE public.dataset_references r SET block_hash_bin = pg_temp.hash(b.i, pg_temp.top(b.i) - 1) FROM broken b
 WHERE b.kind = 11 AND r.dataset_id = b.dataset_id AND r.block_ref_name = 'head';
-- 12 dataset_ref_name_unknown, one table in turn, the head rows untouched:
-- a 'dev' reference, a 'Head' statistics row, a key block in ref 'main', a
-- data block in ref 'dev'.
INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash_bin)
SELECT b.dataset_id, 'dev', pg_temp.hash(b.i, pg_temp.top(b.i)) FROM broken b WHERE b.kind = 12 AND (b.i / 1000) % 4 = 0;
INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size)
SELECT b.dataset_id, 'Head', 0, 0, 0 FROM broken b WHERE b.kind = 12 AND (b.i / 1000) % 4 = 1;
INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT b.dataset_id, 'main', 'SetInfo', 3, pg_temp.hash(b.i, 3, 'main'), pg_temp.payload(b.i, 3, 'SetInfo')
  FROM broken b WHERE b.kind = 12 AND (b.i / 1000) % 4 = 2;
INSERT INTO public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash_bin, block_payload)
SELECT b.dataset_id, 'dev', 'AddData', pg_temp.top(b.i) + 1, pg_temp.hash(b.i, pg_temp.top(b.i) + 1, 'dev'),
       pg_temp.payload(b.i, pg_temp.top(b.i) + 1, 'AddData')
  FROM broken b WHERE b.kind = 12 AND (b.i / 1000) % 4 = 3;
-- 13 dataset_owner_missing: owned by an account that is not in accounts.
UPDATE public.dataset_entries e SET owner_id = 'did:odf:fed04' || lpad(to_hex(b.i), 64, '0') FROM broken b
 WHERE b.kind = 13 AND e.dataset_id = b.dataset_id;

VACUUM (ANALYZE) public.accounts, public.dataset_entries, public.dataset_references, public.dataset_statistics,
                 public.dataset_key_blocks, public.dataset_data_blocks, public.dataset_dependencies;
