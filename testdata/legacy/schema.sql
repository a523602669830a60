-- The application schema pgconsistency watches: the dataset metadata tables of
-- the service (PostgreSQL flavour), as its migrations leave them. Column types,
-- keys, foreign keys and indexes follow the real DDL. Differences, on purpose:
--   * dataset_entries.owner_id has no foreign key to accounts (the accounts
--     tables are out of scope here; the real one was dropped with the
--     cross-domain cascade clean-up anyway);
--   * key blocks and references keep the text block hash, as before the
--     migration to bytea + VIRTUAL generated hex columns (those need PG 18).
-- Schema public, as in the service.

CREATE TYPE public.dataset_kind AS ENUM ('root', 'derivative');

CREATE TYPE public.metadata_event_type AS ENUM (
    'AddData',
    'ExecuteTransform',
    'Seed',
    'SetPollingSource',
    'SetTransform',
    'SetVocab',
    'SetAttachments',
    'SetInfo',
    'SetLicense',
    'SetDataSchema',
    'AddPushSource',
    'DisablePushSource',
    'DisablePollingSource'
);

CREATE TABLE public.dataset_entries (
    dataset_id   VARCHAR(100)        NOT NULL PRIMARY KEY,
    owner_id     VARCHAR(100)        NOT NULL,
    owner_name   VARCHAR(100)        NOT NULL,
    dataset_name VARCHAR(100)        NOT NULL,
    created_at   TIMESTAMPTZ         NOT NULL,
    kind         public.dataset_kind NOT NULL
);

CREATE INDEX idx_dataset_entries_owner_id
    ON public.dataset_entries (owner_id);

CREATE UNIQUE INDEX idx_dataset_entries_owner_id_dataset_name
    ON public.dataset_entries (owner_id, dataset_name);

-- No foreign keys: edges to datasets outside this node are allowed.
CREATE TABLE public.dataset_dependencies (
    upstream_dataset_id   VARCHAR(100) NOT NULL,
    downstream_dataset_id VARCHAR(100) NOT NULL
);

CREATE UNIQUE INDEX idx_dataset_dependencies
    ON public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id);

CREATE INDEX idx_dataset_dependencies_upstream_dataset_id
    ON public.dataset_dependencies (upstream_dataset_id);

CREATE INDEX idx_dataset_dependencies_downstream_dataset_id
    ON public.dataset_dependencies (downstream_dataset_id);

CREATE TABLE public.dataset_references (
    dataset_id     VARCHAR(100) NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name VARCHAR(50)  NOT NULL,
    block_hash     VARCHAR(70)  NOT NULL
);

CREATE UNIQUE INDEX idx_dataset_references
    ON public.dataset_references (dataset_id, block_ref_name);

CREATE TABLE public.dataset_statistics (
    dataset_id       VARCHAR(100) NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name   VARCHAR(50)  NOT NULL,
    last_pulled      TIMESTAMPTZ  DEFAULT NULL,
    num_records      BIGINT       NOT NULL,
    data_size        BIGINT       NOT NULL,
    checkpoints_size BIGINT       NOT NULL
);

CREATE UNIQUE INDEX idx_dataset_statistics
    ON public.dataset_statistics (dataset_id, block_ref_name);

-- The cache of "key" metadata blocks (everything but data blocks).
CREATE TABLE public.dataset_key_blocks (
    dataset_id      VARCHAR(100)               NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name  VARCHAR(50)                NOT NULL,
    event_type      public.metadata_event_type NOT NULL CHECK (
        event_type != 'AddData' AND event_type != 'ExecuteTransform'
    ),
    sequence_number BIGINT                     NOT NULL,
    block_hash      VARCHAR(70)                NOT NULL,
    event_payload   JSONB                      NOT NULL,
    created_at      TIMESTAMPTZ                NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, block_ref_name, sequence_number)
);

CREATE UNIQUE INDEX idx_dataset_key_blocks_block_hash
    ON public.dataset_key_blocks (block_hash);

-- Fast latest-event lookup.
CREATE INDEX idx_dataset_key_blocks_latest_event
    ON public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);
