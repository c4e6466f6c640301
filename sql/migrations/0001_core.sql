-- Core schema: accounts, wallets, a double-entry append-only ledger, the price catalog,
-- usage events (one row per accepted event_id, the exactly-once key), dead letters, outbox.
-- Money is NUMERIC(38, 12): every catalog price is exact per unit at 12 decimals (see billing/money.py).

CREATE FUNCTION billing_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TABLE accounts (
    account_id  text PRIMARY KEY CHECK (length(account_id) BETWEEN 1 AND 200),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every balance the ledger tracks: one per customer wallet plus the platform's own accounts.
CREATE TABLE ledger_accounts (
    ledger_account_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code        text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('wallet', 'revenue', 'equity', 'clearing', 'memo')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO ledger_accounts (code, kind) VALUES
    ('revenue:usage', 'revenue'),         -- what wallets paid for usage
    ('equity:adjustments', 'equity');     -- counterpart of admin credits and debits

-- The prepaid wallet. balance is a cache of SUM(ledger_entries.amount) for its ledger account,
-- updated in the same transaction as the entries; `billing audit` proves they agree.
CREATE TABLE wallets (
    account_id        text PRIMARY KEY REFERENCES accounts,
    ledger_account_id bigint NOT NULL UNIQUE REFERENCES ledger_accounts,
    currency          text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    balance           numeric(38, 12) NOT NULL DEFAULT 0,
    state             text NOT NULL DEFAULT 'exhausted' CHECK (state IN ('active', 'exhausted')),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'active') = (balance > 0))
);

CREATE SEQUENCE posting_ids;

-- One posting is one balanced money movement; its entries sum to zero.
CREATE TABLE postings (
    posting_id  bigint PRIMARY KEY DEFAULT nextval('posting_ids'),
    kind        text NOT NULL CHECK (kind IN ('usage', 'adjustment')),
    reference   text,
    memo        text,
    actor       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE posting_ids OWNED BY postings.posting_id;
CREATE UNIQUE INDEX postings_kind_reference ON postings (kind, reference) WHERE reference IS NOT NULL;

CREATE TABLE ledger_entries (
    entry_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    posting_id        bigint NOT NULL REFERENCES postings,
    ledger_account_id bigint NOT NULL REFERENCES ledger_accounts,
    amount            numeric(38, 12) NOT NULL CHECK (amount <> 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account ON ledger_entries (ledger_account_id, entry_id);
CREATE INDEX ledger_entries_posting ON ledger_entries (posting_id);

-- Double entry, enforced by the database: the entries each INSERT statement writes must balance
-- per posting. (Code writes a posting's entries in one statement.)
CREATE FUNCTION billing_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced bigint;
BEGIN
    SELECT posting_id INTO unbalanced FROM new_entries
        GROUP BY posting_id HAVING sum(amount) <> 0 LIMIT 1;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'posting % does not balance', unbalanced USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION billing_check_balanced();

-- Price catalog: a version is the set of rows sharing (model, provider, effective_from).
-- unit_price is USD per `per` units (per 1M tokens, per 1K images or searches, per 1 request).
CREATE TABLE prices (
    model           text NOT NULL,
    provider        text NOT NULL,
    effective_from  timestamptz NOT NULL,
    billable_class  text NOT NULL CHECK (billable_class IN (
        'input_tokens', 'cached_input_tokens', 'cache_write_tokens', 'output_tokens',
        'image_count', 'web_search_count', 'request')),
    unit_price      numeric(38, 12) NOT NULL CHECK (unit_price >= 0),
    per             bigint NOT NULL CHECK (per IN (1, 1000, 1000000)),
    source          text NOT NULL,
    loaded_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    loaded_by       text,
    PRIMARY KEY (model, provider, effective_from, billable_class),
    -- the price of ONE unit must be exact at 12 decimals (billing/money.py)
    CHECK (mod(unit_price * 1000000000000, per) = 0)
);

-- One row per accepted event_id: the primary key is the exactly-once guarantee.
-- No foreign keys on this hot table (they cost ~21 us per event, half of the insert, measured in
-- docs/performance.md): the batch checks account_id against accounts, which are never deleted
-- (trigger below), and `billing audit` proves every posting_id has its posting and entries.
CREATE TABLE usage_events (
    event_id              text PRIMARY KEY,
    occurred_at           timestamptz NOT NULL,
    recorded_at           timestamptz NOT NULL DEFAULT now(),
    account_id            text NOT NULL,
    api_key_id            text NOT NULL,
    model                 text NOT NULL,
    provider              text NOT NULL,
    byok                  boolean NOT NULL,
    price_effective_from  timestamptz NOT NULL,
    input_tokens          bigint NOT NULL,
    cached_input_tokens   bigint NOT NULL,
    cache_write_tokens    bigint NOT NULL,
    output_tokens         bigint NOT NULL,
    reasoning_tokens      bigint NOT NULL,
    image_count           bigint NOT NULL,
    web_search_count      bigint NOT NULL,
    input_amount          numeric(38, 12) NOT NULL,
    cached_input_amount   numeric(38, 12) NOT NULL,
    cache_write_amount    numeric(38, 12) NOT NULL,
    output_amount         numeric(38, 12) NOT NULL,
    image_amount          numeric(38, 12) NOT NULL,
    web_search_amount     numeric(38, 12) NOT NULL,
    request_amount        numeric(38, 12) NOT NULL,
    amount                numeric(38, 12) NOT NULL,   -- priced total (notional for BYOK)
    debited               numeric(38, 12) NOT NULL,   -- what the wallet paid: amount, or 0 (BYOK)
    posting_id            bigint,                     -- the batch's posting (audited)
    latency_ms            bigint,
    ttft_ms               bigint,
    CHECK (reasoning_tokens <= output_tokens),
    CHECK (amount = input_amount + cached_input_amount + cache_write_amount + output_amount
                    + image_amount + web_search_amount + request_amount),
    CHECK (CASE WHEN byok THEN debited = 0 AND posting_id IS NULL
                ELSE debited = amount AND (posting_id IS NOT NULL OR amount = 0) END)
);
-- Statements select an account's usage by the time it was debited (recorded_at = its posting's
-- created_at, see docs/exports.md); this is the only secondary index on the hot table.
CREATE INDEX usage_events_account_recorded ON usage_events (account_id, recorded_at);

-- Anything accepted from the queue that could not be debited, with the reason and field.
CREATE TABLE dead_letters (
    dead_letter_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dedup_key       text NOT NULL,           -- event_id, or sha256 of a payload with none
    event_id        text,
    account_id      text,
    reason_code     text NOT NULL,
    field           text NOT NULL,
    reason          text NOT NULL,
    payload         bytea NOT NULL,          -- content fields are redacted before storing
    payload_bytes   integer NOT NULL,
    status          text NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'resolved', 'discarded')),
    attempts        integer NOT NULL DEFAULT 1,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    resolution      text
);
CREATE UNIQUE INDEX dead_letters_parked ON dead_letters (dedup_key) WHERE status = 'parked';
CREATE INDEX dead_letters_status_reason ON dead_letters (status, reason_code);

-- Messages for other systems (the gateway), written in the transaction that caused them and
-- published after it commits.
CREATE TABLE outbox (
    outbox_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    routing_key   text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (outbox_id) WHERE published_at IS NULL;

-- Accounts are closed, never deleted: events and postings refer to them without foreign keys.
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION billing_forbid_change();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing_forbid_change();

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['postings', 'ledger_entries', 'prices', 'usage_events'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I
                        FOR EACH ROW EXECUTE FUNCTION billing_forbid_change()', t || '_append_only', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION billing_forbid_change()', t || '_no_truncate', t);
    END LOOP;
END $$;
