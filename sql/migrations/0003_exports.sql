-- Exports (issue 6): account time zones, invoice issuers with gapless numbering, immutable
-- invoices, and the indexes the statement and fleet exports read through.

-- A statement's period is a calendar month in the account's time zone (NULL = UTC).
ALTER TABLE accounts ADD COLUMN time_zone text;

CREATE FUNCTION billing_check_time_zone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.time_zone) THEN
        RAISE EXCEPTION 'unknown time zone %', NEW.time_zone USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_time_zone BEFORE INSERT OR UPDATE OF time_zone ON accounts
    FOR EACH ROW WHEN (NEW.time_zone IS NOT NULL) EXECUTE FUNCTION billing_check_time_zone();

-- Who issues invoices. last_number is the gapless counter: the issuing transaction locks this
-- row FOR UPDATE, inserts invoice last_number + 1 and bumps it, so numbers are 1, 2, 3 ... with
-- no gaps (a sequence would leave gaps on rollback).
CREATE TABLE invoice_issuers (
    issuer       text PRIMARY KEY CHECK (issuer ~ '^[a-z0-9][a-z0-9_-]{0,39}$'),
    legal_name   text NOT NULL CHECK (length(legal_name) BETWEEN 1 AND 200),
    address      text NOT NULL DEFAULT '',
    prefix       text NOT NULL CHECK (prefix ~ '^[A-Z0-9-]{1,20}$'),
    last_number  bigint NOT NULL DEFAULT 0 CHECK (last_number >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO invoice_issuers (issuer, legal_name, prefix) VALUES ('default', 'Gateway Billing', 'INV-');

-- An issued invoice: the exact bytes sent, with their hash. Append-only.
CREATE TABLE invoices (
    invoice_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuer          text NOT NULL REFERENCES invoice_issuers,
    number          bigint NOT NULL CHECK (number > 0),
    kind            text NOT NULL CHECK (kind IN ('topup_receipt', 'usage_statement')),
    account_id      text NOT NULL REFERENCES accounts,
    period          text CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    topup_id        text,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    issued_by       text,
    format          text NOT NULL CHECK (format IN ('html', 'csv', 'xlsx', 'parquet')),
    total           numeric(38, 12) NOT NULL,
    content         bytea NOT NULL,
    content_sha256  text NOT NULL CHECK (content_sha256 = encode(sha256(content), 'hex')),
    UNIQUE (issuer, number),
    CHECK ((kind = 'usage_statement') = (period IS NOT NULL)),
    CHECK ((kind = 'topup_receipt') = (topup_id IS NOT NULL))
);
-- Issuing twice returns the existing invoice: one statement per account and period, one receipt
-- per top-up.
CREATE UNIQUE INDEX invoices_statement ON invoices (kind, account_id, period) WHERE period IS NOT NULL;
CREATE UNIQUE INDEX invoices_receipt ON invoices (kind, topup_id) WHERE topup_id IS NOT NULL;
CREATE INDEX invoices_account ON invoices (account_id, issued_at);

-- Receipts reference the top-ups table of migration 0002 when it exists.
DO $$
BEGIN
    IF to_regclass('topups') IS NOT NULL THEN
        ALTER TABLE invoices ADD CONSTRAINT invoices_topup_fk FOREIGN KEY (topup_id) REFERENCES topups;
    END IF;
END $$;

CREATE TRIGGER invoices_append_only BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION billing_forbid_change();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION billing_forbid_change();

-- Statements: balances at the period bounds and the movements in between, per wallet.
CREATE INDEX ledger_entries_account_time ON ledger_entries (ledger_account_id, created_at)
    INCLUDE (amount);
-- (usage_events (account_id, recorded_at), which statements use, is created in 0001.)

-- A statement period's bounds for each account (or one): the calendar month in the account's
-- time zone. One definition for every statement query (inlined by the planner: plain SQL).
CREATE FUNCTION billing_period_bounds(p_year int, p_month int, p_end_year int, p_end_month int,
                                      p_account text)
RETURNS TABLE (account_id text, name text, time_zone text, ledger_account_id bigint,
               period_start timestamptz, period_end timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT a.account_id, a.name, coalesce(a.time_zone, 'UTC'), w.ledger_account_id,
           make_timestamptz(p_year, p_month, 1, 0, 0, 0, coalesce(a.time_zone, 'UTC')),
           make_timestamptz(p_end_year, p_end_month, 1, 0, 0, 0, coalesce(a.time_zone, 'UTC'))
    FROM accounts a JOIN wallets w USING (account_id)
    WHERE p_account IS NULL OR a.account_id = p_account
$$;
