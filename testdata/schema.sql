-- The application schema pgconsistency watches, in its current shape: the
-- tables the dataset invariants read, as the service's PostgreSQL migrations
-- (kamu-data/kamu-cli, migrations/postgres/, master as of 2026-08-07) leave
-- them. Column names, types, order, keys, foreign keys, CHECKs and index
-- names follow the real DDL; this file creates the end state directly rather
-- than replaying the ALTERs.
--
-- Migrations followed, by table:
--   accounts             20240314140913_accounts_table, 20250121102649_require_account_emails
--                        (email NOT NULL), 20250416135830_correct_account_and_accounts-
--                        passwords_indexes (unique on LOWER(...)),
--                        20250425151059_remove_is_admin_from_account (is_admin dropped)
--   dataset_entries      20240930141148_dataset_entries_table, 20250325081853_summary_fields
--                        (kind), 20250422121141_account_name_in_entry (owner_name),
--                        20250520113910 + 20250609154246 (owner FK added with a cascade,
--                        then dropped: no cross-domain FK), 20251106173436_dataset-
--                        entries_update_indexes (unique on owner_id, LOWER(dataset_name))
--   dataset_dependencies 20241125193114_dataset_dependencies (no foreign keys)
--   dataset_references   20250228195609_dataset_references, 20251021171405_dataset_data_blocks
--                        (block_hash varchar replaced by block_hash_bin + block_hash_hex)
--   dataset_statistics   20250325081853_summary_fields,
--                        20251112180821_extend_dataset_statistics_with_object_links
--   dataset_key_blocks   20250331122346_create_dataset_key_blocks, re-created by
--                        20251021171405_dataset_data_blocks
--   dataset_data_blocks  20251021171405_dataset_data_blocks
--
-- Deliberate differences from the real database:
--   * Only these tables and the types they need; accounts_passwords,
--     access_tokens and the rest of the service are left out (nothing here
--     references them).
--   * accounts stops at master: the resource_id UUID column (20260722120000,
--     an unmerged pull request as of 2026-08-07) and the
--     (provider, provider_identity_key) unique index (20260814190000, not on
--     master then) are not applied. The invariants read accounts.id only.
--   * Not a difference, but easy to get wrong: block_hash_hex is STORED, as
--     the service has it on master (its migration says "VIRTUAL after
--     Postgres 18"; an earlier version of that migration used VIRTUAL).
--   * Nothing else: in particular dataset_entries.owner_id has no foreign key
--     to accounts and dataset_dependencies none at all, as in the service.
-- Everything lives in schema public, as in the service.

CREATE TYPE public.account_type AS ENUM ('user', 'organization');

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

CREATE TABLE public.accounts (
    id                    VARCHAR(100)        NOT NULL PRIMARY KEY,
    account_name          VARCHAR(100)        NOT NULL,
    email                 VARCHAR(320)        NOT NULL,
    display_name          VARCHAR(200)        NOT NULL,
    account_type          public.account_type NOT NULL,
    avatar_url            VARCHAR(1000),
    registered_at         TIMESTAMPTZ         NOT NULL,
    provider              VARCHAR(25)         NOT NULL,
    provider_identity_key VARCHAR(100)        NOT NULL
);

CREATE UNIQUE INDEX idx_accounts_name
    ON public.accounts (LOWER(account_name));

CREATE UNIQUE INDEX idx_accounts_email
    ON public.accounts (LOWER(email));

CREATE UNIQUE INDEX idx_accounts_provider_identity_key
    ON public.accounts (provider_identity_key);

-- No foreign key from owner_id to accounts (dropped in 20250609154246: no
-- cross-domain references), so a dataset can outlive its owner.
CREATE TABLE public.dataset_entries (
    dataset_id   VARCHAR(100)        NOT NULL PRIMARY KEY,
    owner_id     VARCHAR(100)        NOT NULL,
    dataset_name VARCHAR(100)        NOT NULL,
    created_at   TIMESTAMPTZ         NOT NULL,
    kind         public.dataset_kind NOT NULL,
    owner_name   VARCHAR(100)        NOT NULL
);

CREATE INDEX idx_dataset_entries_owner_id
    ON public.dataset_entries (owner_id);

CREATE UNIQUE INDEX idx_dataset_entries_owner_id_dataset_name
    ON public.dataset_entries (owner_id, LOWER(dataset_name));

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

-- Hashes are the 32-byte digest; block_hash_hex is its multihash text form
-- ('f1620' = multibase base16 prefix 'f' + multihash sha3-256 header 1620).
CREATE TABLE public.dataset_references (
    dataset_id     VARCHAR(100) NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name VARCHAR(50)  NOT NULL,
    block_hash_bin BYTEA        NOT NULL,
    block_hash_hex TEXT GENERATED ALWAYS AS (('f1620' || encode(block_hash_bin, 'hex'))) STORED
);

CREATE UNIQUE INDEX idx_dataset_references
    ON public.dataset_references (dataset_id, block_ref_name);

CREATE TABLE public.dataset_statistics (
    dataset_id        VARCHAR(100) NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name    VARCHAR(50)  NOT NULL,
    last_pulled       TIMESTAMPTZ  DEFAULT NULL,
    num_records       BIGINT       NOT NULL,
    data_size         BIGINT       NOT NULL,
    checkpoints_size  BIGINT       NOT NULL,
    num_object_links  BIGINT       NOT NULL DEFAULT 0,
    object_links_size BIGINT       NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX idx_dataset_statistics
    ON public.dataset_statistics (dataset_id, block_ref_name);

-- The metadata chain is split over two tables: data blocks (AddData,
-- ExecuteTransform) in dataset_data_blocks, every other event ("key" blocks)
-- here. Each table's primary key sees only its own half of the chain.
CREATE TABLE public.dataset_key_blocks (
    dataset_id      VARCHAR(100)               NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name  VARCHAR(50)                NOT NULL,
    event_type      public.metadata_event_type NOT NULL CHECK (
        event_type != 'AddData' AND event_type != 'ExecuteTransform'
    ),
    sequence_number BIGINT                     NOT NULL,
    block_hash_bin  BYTEA                      NOT NULL,
    block_hash_hex  TEXT GENERATED ALWAYS AS (('f1620' || encode(block_hash_bin, 'hex'))) STORED,
    block_payload   BYTEA                      NOT NULL,
    PRIMARY KEY (dataset_id, block_ref_name, sequence_number)
);

-- Fast latest-event lookup.
CREATE INDEX idx_dataset_key_blocks_latest_event
    ON public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);

-- Block hash lookups.
CREATE UNIQUE INDEX idx_dataset_key_blocks_by_hash
    ON public.dataset_key_blocks (dataset_id, block_hash_bin);

CREATE TABLE public.dataset_data_blocks (
    dataset_id      VARCHAR(100)               NOT NULL REFERENCES public.dataset_entries (dataset_id) ON DELETE CASCADE,
    block_ref_name  VARCHAR(50)                NOT NULL,
    event_type      public.metadata_event_type NOT NULL CHECK (
        event_type = 'AddData' OR event_type = 'ExecuteTransform'
    ),
    sequence_number BIGINT                     NOT NULL,
    block_hash_bin  BYTEA                      NOT NULL,
    block_hash_hex  TEXT GENERATED ALWAYS AS (('f1620' || encode(block_hash_bin, 'hex'))) STORED,
    block_payload   BYTEA                      NOT NULL,
    PRIMARY KEY (dataset_id, block_ref_name, sequence_number)
);

CREATE INDEX idx_dataset_data_blocks_latest_event
    ON public.dataset_data_blocks (dataset_id, block_ref_name, event_type, sequence_number DESC);

CREATE UNIQUE INDEX idx_dataset_data_blocks_by_hash
    ON public.dataset_data_blocks (dataset_id, block_hash_bin);
