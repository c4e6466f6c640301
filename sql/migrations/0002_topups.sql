-- Stripe top-ups: the platform fee, refunds, disputes, auto top-up and the webhook inbox.
-- Money is NUMERIC(38, 12) like everywhere else; every amount here is whole cents
-- (billing/topups.py computes it with billing.money.to_cents).

INSERT INTO ledger_accounts (code, kind) VALUES
    ('revenue:fees', 'revenue'),              -- the platform fee on top-ups
    ('clearing:stripe', 'clearing'),          -- money Stripe holds for us (gross of Stripe's own fees)
    ('liability:dispute_holds', 'clearing');  -- credit taken out of a wallet while a dispute is open

ALTER TABLE postings DROP CONSTRAINT postings_kind_check;
ALTER TABLE postings ADD CONSTRAINT postings_kind_check CHECK (kind IN (
    'usage', 'adjustment',
    'topup', 'topup_refund', 'dispute_hold', 'dispute_release', 'dispute_loss'));

-- A disputed wallet is frozen: the gateway stops serving it (published as wallet.frozen).
ALTER TABLE wallets ADD COLUMN frozen boolean NOT NULL DEFAULT false;

-- One Stripe customer per account, created once (idempotency key "customer:<account_id>").
CREATE TABLE stripe_customers (
    account_id          text PRIMARY KEY REFERENCES accounts,
    stripe_customer_id  text NOT NULL UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE topups (
    topup_id                    text PRIMARY KEY,
    account_id                  text NOT NULL REFERENCES accounts,
    kind                        text NOT NULL DEFAULT 'manual'
                                CHECK (kind IN ('manual', 'checkout', 'auto')),
    credit                      numeric(38, 12) NOT NULL CHECK (credit > 0),
    fee                         numeric(38, 12) NOT NULL CHECK (fee >= 0),
    charged                     numeric(38, 12) NOT NULL,
    currency                    text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    status                      text NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'succeeded', 'failed', 'canceled')),
    refunded_credit             numeric(38, 12) NOT NULL DEFAULT 0,
    refunded_fee                numeric(38, 12) NOT NULL DEFAULT 0,
    stripe_payment_intent_id    text UNIQUE,
    stripe_checkout_session_id  text UNIQUE,
    stripe_charge_id            text UNIQUE,
    failure_reason              text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    succeeded_at                timestamptz,
    credit_posting_id           bigint REFERENCES postings,
    CHECK (charged = credit + fee),
    CHECK (mod(credit * 100, 1) = 0 AND mod(fee * 100, 1) = 0),
    CHECK (refunded_credit BETWEEN 0 AND credit AND refunded_fee BETWEEN 0 AND fee),
    CHECK ((status = 'succeeded') = (credit_posting_id IS NOT NULL)),
    CHECK (status = 'succeeded' OR (refunded_credit = 0 AND refunded_fee = 0))
);
CREATE INDEX topups_account ON topups (account_id, created_at);
CREATE INDEX topups_created ON topups (created_at);

-- Every posting that moved money for a top-up (the top-up itself, refunds, dispute movements).
CREATE TABLE topup_postings (
    posting_id  bigint PRIMARY KEY REFERENCES postings,
    topup_id    text NOT NULL REFERENCES topups,
    kind        text NOT NULL
);
CREATE INDEX topup_postings_topup ON topup_postings (topup_id);

-- Disputes we know of. held_credit left the wallet into liability:dispute_holds; fee_part is
-- the platform fee share of the disputed amount, given back only if the dispute is lost.
CREATE TABLE stripe_disputes (
    dispute_id          text PRIMARY KEY,
    topup_id            text NOT NULL REFERENCES topups,
    account_id          text NOT NULL REFERENCES accounts,
    amount              numeric(38, 12) NOT NULL CHECK (amount > 0),
    held_credit         numeric(38, 12) NOT NULL CHECK (held_credit >= 0),
    fee_part            numeric(38, 12) NOT NULL CHECK (fee_part >= 0),
    status              text NOT NULL CHECK (status IN ('held', 'won', 'lost')),
    stripe_status       text NOT NULL,
    hold_posting_id     bigint REFERENCES postings,
    close_posting_id    bigint REFERENCES postings,
    created_at          timestamptz NOT NULL DEFAULT now(),
    closed_at           timestamptz,
    CHECK (amount = held_credit + fee_part),
    CHECK ((status = 'held') = (closed_at IS NULL))
);
CREATE INDEX stripe_disputes_account_open ON stripe_disputes (account_id) WHERE status = 'held';

-- The webhook inbox: every verified event, stored raw in the request that received it, keyed by
-- Stripe's event id (a redelivery is the same row). processed_at is set in the transaction that
-- moved the money.
CREATE TABLE stripe_events (
    event_id      text PRIMARY KEY,
    type          text NOT NULL,
    api_version   text,
    livemode      boolean NOT NULL DEFAULT false,
    payload       bytea NOT NULL,            -- the exact bytes Stripe signed
    event         jsonb NOT NULL,            -- the same, parsed
    received_at   timestamptz NOT NULL DEFAULT now(),
    deliveries    integer NOT NULL DEFAULT 1,
    attempts      integer NOT NULL DEFAULT 0,
    processed_at  timestamptz,
    outcome       text,
    last_error    text
);
CREATE INDEX stripe_events_pending ON stripe_events (received_at) WHERE processed_at IS NULL;

-- Auto top-up: when the wallet is below threshold, charge `amount` of credit (+ fee) off-session
-- on the saved payment method. pending_topup_id is set while an intent is in flight (at most one).
CREATE TABLE auto_topup_settings (
    account_id               text PRIMARY KEY REFERENCES accounts,
    enabled                  boolean NOT NULL DEFAULT true,
    threshold                numeric(38, 12) NOT NULL CHECK (threshold >= 0),
    amount                   numeric(38, 12) NOT NULL CHECK (amount > 0),
    payment_method           text NOT NULL,
    pending_topup_id         text REFERENCES topups,
    pending_intent_id        text,
    attempts                 integer NOT NULL DEFAULT 0,
    disabled_reason          text,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
