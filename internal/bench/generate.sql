-- Benchmark data for pgconsistency: the application schema of
-- testdata/schema.sql filled at a given scale, with anomalies at known rates.
-- Run with psql -v scale=N on a database holding testdata/schema.sql.
--
-- Shape (per dataset i in 1..:scale), like production:
--   * ids as in the service: 'did:odf:fed01' + 64 hex digits (77 characters),
--     block hashes 'f1620' + 64 hex digits; one owner per 10 datasets;
--   * 30% derivative (i % 10 in 0, 1, 2), each with one upstream edge;
--   * a head reference and a statistics row per dataset, a second ref
--     ('dev', with its statistics) on every 5th dataset;
--   * 5 key blocks per dataset (Seed at 0, then 4 other key events), with a
--     JSON payload of about 150 bytes.
-- Anomalies: one dataset in 1,000 per invariant, disjoint, chosen by i % 1000
-- (see bench.go, expectedAnomalies). The unique indexes on references and
-- statistics are replaced by plain ones so that duplicates can exist: the
-- drift the duplicated-* invariants watch for.

\set ON_ERROR_STOP 1
SET synchronous_commit = off;
SET maintenance_work_mem = '1GB';

-- Indexes are built after the load, as a restore would.
DROP INDEX public.idx_dataset_entries_owner_id, public.idx_dataset_entries_owner_id_dataset_name,
           public.idx_dataset_dependencies, public.idx_dataset_dependencies_upstream_dataset_id,
           public.idx_dataset_dependencies_downstream_dataset_id,
           public.idx_dataset_references, public.idx_dataset_statistics,
           public.idx_dataset_key_blocks_block_hash, public.idx_dataset_key_blocks_latest_event;
ALTER TABLE public.dataset_references DROP CONSTRAINT dataset_references_dataset_id_fkey;
ALTER TABLE public.dataset_statistics DROP CONSTRAINT dataset_statistics_dataset_id_fkey;
ALTER TABLE public.dataset_key_blocks DROP CONSTRAINT dataset_key_blocks_dataset_id_fkey,
                                      DROP CONSTRAINT dataset_key_blocks_pkey;
ALTER TABLE public.dataset_entries DROP CONSTRAINT dataset_entries_pkey;

CREATE FUNCTION pg_temp.did(i bigint) RETURNS varchar LANGUAGE sql IMMUTABLE
AS $$ SELECT ('did:odf:fed01' || lpad(to_hex(i), 64, '0'))::varchar $$;
CREATE FUNCTION pg_temp.hash(i bigint, ref text, seq bigint) RETURNS varchar LANGUAGE sql IMMUTABLE
AS $$ SELECT ('f1620' || md5(i || '/' || ref || '/' || seq) || md5(seq || '/' || ref || '/' || i))::varchar $$;

INSERT INTO public.dataset_entries (dataset_id, owner_id, owner_name, dataset_name, created_at, kind)
SELECT pg_temp.did(i),
       pg_temp.did(1000000000 + i / 10),
       'account' || (i / 10),
       CASE WHEN i % 10 < 3 THEN 'derived.' ELSE 'ingest.' END || i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
       CASE WHEN i % 10 < 3 THEN 'derivative' ELSE 'root' END::public.dataset_kind
  FROM generate_series(1, :scale) AS i;

INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash)
SELECT pg_temp.did(i), ref, pg_temp.hash(i, ref, 4)
  FROM generate_series(1, :scale) AS i,
       LATERAL (VALUES ('head'), ('dev')) AS r(ref)
 WHERE ref = 'head' OR i % 5 = 0;

INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, last_pulled, num_records, data_size, checkpoints_size)
SELECT pg_temp.did(i), ref, timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second',
       1000 * (i % 977), 65536 * (i % 977), 4096 * (i % 13)
  FROM generate_series(1, :scale) AS i,
       LATERAL (VALUES ('head'), ('dev')) AS r(ref)
 WHERE ref = 'head' OR i % 5 = 0;

INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash, event_payload, created_at)
SELECT pg_temp.did(i), 'head', ev::public.metadata_event_type, seq, pg_temp.hash(i, 'head', seq),
       jsonb_build_object('kind', ev, 'dataset', 'ingest.' || i,
                          'schema', 'arrow:' || md5(i::text), 'note', repeat('x', 40)),
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second' + seq * interval '1 minute'
  FROM generate_series(1, :scale) AS i,
       LATERAL (SELECT * FROM (VALUES (0, 'Seed'), (1, 'SetPollingSource'), (2, 'SetDataSchema'),
                                      (3, 'SetInfo'), (4, 'SetLicense')) AS v(seq, ev) WHERE i % 10 >= 3
                UNION ALL
                SELECT * FROM (VALUES (0, 'Seed'), (1, 'SetTransform'), (2, 'SetDataSchema'),
                                      (3, 'SetInfo'), (4, 'SetVocab')) AS v(seq, ev) WHERE i % 10 < 3) AS b;

-- Each derivative reads the root dataset three ids later (or, past the end,
-- a dataset of another node: edges need no foreign key).
INSERT INTO public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id)
SELECT pg_temp.did(i + 3), pg_temp.did(i)
  FROM generate_series(1, :scale) AS i
 WHERE i % 10 < 3;

-- Keys and indexes, as testdata/schema.sql has them, but for the two unique
-- indexes that would forbid the duplicated-* anomalies.
ALTER TABLE public.dataset_entries ADD PRIMARY KEY (dataset_id);
CREATE INDEX idx_dataset_entries_owner_id ON public.dataset_entries (owner_id);
CREATE UNIQUE INDEX idx_dataset_entries_owner_id_dataset_name ON public.dataset_entries (owner_id, dataset_name);
CREATE UNIQUE INDEX idx_dataset_dependencies ON public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id);
CREATE INDEX idx_dataset_dependencies_upstream_dataset_id ON public.dataset_dependencies (upstream_dataset_id);
CREATE INDEX idx_dataset_dependencies_downstream_dataset_id ON public.dataset_dependencies (downstream_dataset_id);
CREATE INDEX idx_dataset_references ON public.dataset_references (dataset_id, block_ref_name);
CREATE INDEX idx_dataset_statistics ON public.dataset_statistics (dataset_id, block_ref_name);
ALTER TABLE public.dataset_key_blocks ADD PRIMARY KEY (dataset_id, block_ref_name, sequence_number);
CREATE UNIQUE INDEX idx_dataset_key_blocks_block_hash ON public.dataset_key_blocks (block_hash);
CREATE INDEX idx_dataset_key_blocks_latest_event
    ON public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);
ALTER TABLE public.dataset_references ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;
ALTER TABLE public.dataset_statistics ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;
ALTER TABLE public.dataset_key_blocks ADD FOREIGN KEY (dataset_id) REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE;

-- Anomalies, one dataset in 1,000 per invariant.
-- 1: no head reference
DELETE FROM public.dataset_references r USING generate_series(1, :scale) AS i
 WHERE i % 1000 = 1 AND r.dataset_id = pg_temp.did(i) AND r.block_ref_name = 'head';
-- 2: two head references
INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash)
SELECT pg_temp.did(i), 'head', pg_temp.hash(i, 'head', 3) FROM generate_series(1, :scale) AS i WHERE i % 1000 = 2;
-- 3: no statistics
DELETE FROM public.dataset_statistics s USING generate_series(1, :scale) AS i
 WHERE i % 1000 = 3 AND s.dataset_id = pg_temp.did(i);
-- 4: statistics of head twice
INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size)
SELECT pg_temp.did(i), 'head', 0, 0, 0 FROM generate_series(1, :scale) AS i WHERE i % 1000 = 4;
-- 5: no key blocks at all
DELETE FROM public.dataset_key_blocks k USING generate_series(1, :scale) AS i
 WHERE i % 1000 = 5 AND k.dataset_id = pg_temp.did(i);
-- 6: the incident: the Seed is gone
DELETE FROM public.dataset_key_blocks k USING generate_series(1, :scale) AS i
 WHERE i % 1000 = 6 AND k.dataset_id = pg_temp.did(i) AND k.event_type = 'Seed';
-- 7: the Seed moved to sequence number 5
UPDATE public.dataset_key_blocks k SET sequence_number = 5 FROM generate_series(1, :scale) AS i
 WHERE i % 1000 = 7 AND k.dataset_id = pg_temp.did(i) AND k.event_type = 'Seed';
-- 10 (a derivative): its dependency edge is gone
DELETE FROM public.dataset_dependencies d USING generate_series(1, :scale) AS i
 WHERE i % 1000 = 10 AND d.downstream_dataset_id = pg_temp.did(i);

VACUUM (ANALYZE) public.dataset_entries, public.dataset_references, public.dataset_statistics,
                 public.dataset_key_blocks, public.dataset_dependencies;
