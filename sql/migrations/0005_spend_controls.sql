-- Spend controls (issue 9): holds (reservations) that stop concurrent requests from overdrawing a
-- wallet, per-API-key spending limits enforced by the same hold path, and per-model hold ceilings.
--
-- A hold is a reservation, not ledger money: a wallet's
--     held      = sum(amount) of its active, unexpired, non-BYOK holds
--     available = balance - held - granted credit already past its expiry (not yet posted)
-- billing_authorize() is the one round trip the gateway makes before dispatching a request.

-- The worst case of a request without max_tokens: USD on top of its input cost.
CREATE TABLE hold_ceilings (
    model       text PRIMARY KEY CHECK (length(model) BETWEEN 1 AND 200),
    amount      numeric(38, 12) NOT NULL CHECK (amount > 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text
);

-- A spending limit per API key over a calendar period in a time zone (day, ISO week, month).
CREATE TABLE key_limits (
    api_key_id  text PRIMARY KEY CHECK (length(api_key_id) BETWEEN 1 AND 200),
    account_id  text NOT NULL REFERENCES accounts,
    amount      numeric(38, 12) NOT NULL CHECK (amount >= 0),
    period      text NOT NULL CHECK (period IN ('day', 'week', 'month')),
    time_zone   text NOT NULL DEFAULT 'UTC',
    count_byok  boolean NOT NULL DEFAULT false,   -- BYOK notional cost counts toward the limit
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text
);
CREATE INDEX key_limits_account ON key_limits (account_id);  -- the usage batch's look-up
CREATE TRIGGER key_limits_time_zone BEFORE INSERT OR UPDATE OF time_zone ON key_limits
    FOR EACH ROW EXECUTE FUNCTION billing_check_time_zone();

-- What a limited key spent per period: the settled amount of its holds (written by the
-- settlement statement of the usage batch, in the same transaction as the debit).
CREATE TABLE key_spend (
    api_key_id    text NOT NULL,
    period_start  timestamptz NOT NULL,
    spent         numeric(38, 12) NOT NULL DEFAULT 0 CHECK (spent >= 0),
    PRIMARY KEY (api_key_id, period_start)
);

CREATE TABLE holds (
    hold_id             text PRIMARY KEY CHECK (length(hold_id) BETWEEN 1 AND 200),
    account_id          text NOT NULL REFERENCES accounts,
    api_key_id          text NOT NULL,
    model               text NOT NULL,
    provider            text NOT NULL,
    byok                boolean NOT NULL,       -- held against the key limit only, never the wallet
    amount              numeric(38, 12) NOT NULL CHECK (amount >= 0),
    status              text NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'settled', 'released', 'expired')),
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    limit_period_start  timestamptz,            -- the key-limit period it counts in (NULL: no limit)
    member_account_id   text,                   -- a sub-account's request, held on its org's wallet
    member_period_start timestamptz,            -- the member-limit period it counts in
    closed_at           timestamptz,
    settled_event_id    text UNIQUE,
    settled_amount      numeric(38, 12) CHECK (settled_amount >= 0),
    close_reason        text,
    CHECK (expires_at > created_at),
    CHECK ((status = 'active') = (closed_at IS NULL)),
    CHECK ((status = 'settled') = (settled_event_id IS NOT NULL AND settled_amount IS NOT NULL))
);
CREATE INDEX holds_account_active ON holds (account_id) INCLUDE (amount, expires_at, byok)
    WHERE status = 'active';
CREATE INDEX holds_key_active ON holds (api_key_id, limit_period_start) INCLUDE (amount, expires_at)
    WHERE status = 'active';
CREATE INDEX holds_expiry ON holds (expires_at) WHERE status = 'active';
CREATE INDEX holds_member_active ON holds (member_account_id, member_period_start)
    INCLUDE (amount, expires_at) WHERE status = 'active' AND member_account_id IS NOT NULL;
CREATE INDEX holds_account_created ON holds (account_id, created_at);

-- Sub-accounts: a member account's usage is paid from its organisation's wallet (one level: an
-- organisation is never a member). Optional per-member limit per period, like a key limit.
CREATE TABLE account_members (
    member_account_id  text PRIMARY KEY REFERENCES accounts,
    org_account_id     text NOT NULL REFERENCES accounts,
    limit_amount       numeric(38, 12) CHECK (limit_amount >= 0),
    limit_period       text CHECK (limit_period IN ('day', 'week', 'month')),
    time_zone          text NOT NULL DEFAULT 'UTC',
    added_at           timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),   -- the limit last set
    added_by           text,
    CHECK (member_account_id <> org_account_id),
    CHECK ((limit_amount IS NULL) = (limit_period IS NULL))
);
CREATE INDEX account_members_org ON account_members (org_account_id);
CREATE TRIGGER account_members_time_zone BEFORE INSERT OR UPDATE OF time_zone ON account_members
    FOR EACH ROW EXECUTE FUNCTION billing_check_time_zone();

-- What a limited member spent per period (settled holds), like key_spend.
CREATE TABLE member_spend (
    member_account_id  text NOT NULL,
    period_start       timestamptz NOT NULL,
    spent              numeric(38, 12) NOT NULL DEFAULT 0 CHECK (spent >= 0),
    PRIMARY KEY (member_account_id, period_start)
);

-- Which usage posting debited an organisation's wallet for a member's events, and how much:
-- the audit maps those events to the paying wallet, and statements attribute them to the member.
CREATE TABLE usage_attributions (
    posting_id         bigint NOT NULL,
    member_account_id  text NOT NULL,
    payer_account_id   text NOT NULL,
    amount             numeric(38, 12) NOT NULL CHECK (amount > 0),
    PRIMARY KEY (posting_id, member_account_id)
);
CREATE INDEX usage_attributions_payer ON usage_attributions (payer_account_id, posting_id);

-- The start of the limit period containing p_at, in time zone p_tz.
CREATE FUNCTION billing_limit_period_start(p_period text, p_tz text, p_at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE STRICT AS $$
    SELECT date_trunc(p_period, p_at AT TIME ZONE p_tz) AT TIME ZONE p_tz
$$;

-- The end of that period (exclusive), in the same zone (a DST day is 23 or 25 hours long).
CREATE FUNCTION billing_limit_period_end(p_period text, p_tz text, p_at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE STRICT AS $$
    SELECT (date_trunc(p_period, p_at AT TIME ZONE p_tz) + ('1 ' || p_period)::interval)
           AT TIME ZONE p_tz
$$;

-- What a wallet has reserved at p_now: its active, unexpired, non-BYOK holds.
CREATE FUNCTION billing_wallet_held(p_account text, p_now timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(h.amount), 0)::numeric(38, 12) FROM holds h
    WHERE h.account_id = p_account AND h.status = 'active' AND NOT h.byok AND h.expires_at > p_now
$$;

-- What a limited key has used in the period starting p_period: settled spend plus active holds.
CREATE FUNCTION billing_key_used(p_key text, p_period timestamptz, p_now timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT (coalesce((SELECT s.spent FROM key_spend s
                      WHERE s.api_key_id = p_key AND s.period_start = p_period), 0)
          + coalesce((SELECT sum(h.amount) FROM holds h
                      WHERE h.api_key_id = p_key AND h.status = 'active'
                        AND h.limit_period_start = p_period AND h.expires_at > p_now), 0)
           )::numeric(38, 12)
$$;

-- What a limited member has used in the period starting p_period.
CREATE FUNCTION billing_member_used(p_member text, p_period timestamptz, p_now timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT (coalesce((SELECT s.spent FROM member_spend s
                      WHERE s.member_account_id = p_member AND s.period_start = p_period), 0)
          + coalesce((SELECT sum(h.amount) FROM holds h
                      WHERE h.member_account_id = p_member AND h.status = 'active'
                        AND h.member_period_start = p_period AND h.expires_at > p_now), 0)
           )::numeric(38, 12)
$$;

-- Authorize one request: ONE call. Locks the paying wallet's row (the account's own, or its
-- organisation's for a member), serialising every authorization and every debit of that wallet;
-- checks the frozen flag, the available balance, the key limit and the member limit; inserts the
-- hold. p_amount is the worst case priced by the caller from the catalog
-- (billing.holds.worst_case); with p_use_ceiling the model's configured ceiling is added.
-- A retried call with the same hold_id returns the hold already made.
CREATE FUNCTION billing_authorize(
    p_hold_id text, p_account text, p_key text, p_model text, p_provider text, p_byok boolean,
    p_amount numeric, p_use_ceiling boolean, p_ttl interval, p_now timestamptz)
RETURNS TABLE (allowed boolean, reason text, hold_id text, amount numeric, available numeric,
               key_remaining numeric, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_amount    numeric(38, 12) := p_amount;
    v_ceiling   numeric(38, 12);
    v_limit     key_limits%ROWTYPE;
    v_has_limit boolean;
    v_period    timestamptz;
    v_member    account_members%ROWTYPE;
    v_is_member boolean;
    v_payer     text := p_account;
    v_mperiod   timestamptz;
    v_mleft     numeric(38, 12);
    v_frozen    boolean;
    v_avail     numeric(38, 12);
    v_key_left  numeric(38, 12);
    v_old       holds%ROWTYPE;
BEGIN
    IF p_use_ceiling THEN
        SELECT c.amount INTO v_ceiling FROM hold_ceilings c WHERE c.model = p_model;
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, 'no_ceiling'::text, NULL::text, NULL::numeric,
                NULL::numeric, NULL::numeric, NULL::timestamptz;
            RETURN;
        END IF;
        v_amount := v_amount + v_ceiling;
    END IF;
    SELECT * INTO v_limit FROM key_limits l WHERE l.api_key_id = p_key AND l.account_id = p_account;
    v_has_limit := FOUND;
    SELECT * INTO v_member FROM account_members m WHERE m.member_account_id = p_account;
    v_is_member := FOUND;
    IF v_is_member THEN
        v_payer := v_member.org_account_id;
    END IF;
    IF p_byok AND NOT (v_has_limit AND v_limit.count_byok) THEN
        -- BYOK costs the wallet nothing: no hold and no lock, but a known, unfrozen account
        SELECT w.frozen INTO v_frozen FROM wallets w WHERE w.account_id = v_payer;
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, 'unknown_account'::text, NULL::text, NULL::numeric,
                NULL::numeric, NULL::numeric, NULL::timestamptz;
        ELSIF v_frozen THEN
            RETURN QUERY SELECT false, 'wallet_frozen'::text, NULL::text, 0::numeric,
                NULL::numeric, NULL::numeric, NULL::timestamptz;
        ELSE
            RETURN QUERY SELECT true, 'byok'::text, NULL::text, 0::numeric, NULL::numeric,
                NULL::numeric, NULL::timestamptz;
        END IF;
        RETURN;
    END IF;
    -- The lock. Every later statement sees what committed before it was granted.
    PERFORM 1 FROM wallets w WHERE w.account_id = v_payer FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 'unknown_account'::text, NULL::text, NULL::numeric,
            NULL::numeric, NULL::numeric, NULL::timestamptz;
        RETURN;
    END IF;
    -- A retried call (same hold_id) returns the hold made the first time. Read under the wallet
    -- lock, so that two concurrent first calls with one hold_id make one hold, not an error.
    SELECT * INTO v_old FROM holds h WHERE h.hold_id = p_hold_id;
    IF FOUND THEN
        IF coalesce(v_old.member_account_id, v_old.account_id) <> p_account
           OR v_old.api_key_id <> p_key THEN
            RAISE EXCEPTION 'hold % belongs to another account or key', p_hold_id
                USING ERRCODE = 'unique_violation';
        END IF;
        RETURN QUERY SELECT true, 'existing'::text, v_old.hold_id, v_old.amount,
            NULL::numeric, NULL::numeric, v_old.expires_at;
        RETURN;
    END IF;
    IF v_has_limit THEN
        v_period := billing_limit_period_start(v_limit.period, v_limit.time_zone, p_now);
    END IF;
    IF v_is_member AND v_member.limit_amount IS NOT NULL THEN
        v_mperiod := billing_limit_period_start(v_member.limit_period, v_member.time_zone, p_now);
    END IF;
    -- one statement, one snapshot: balance, holds and spend are read together
    SELECT w.frozen,
           w.balance - billing_wallet_held(v_payer, p_now) - billing_grants_lapsed(v_payer, p_now),
           CASE WHEN v_has_limit
                THEN v_limit.amount - billing_key_used(p_key, v_period, p_now) END,
           CASE WHEN v_mperiod IS NOT NULL
                THEN v_member.limit_amount - billing_member_used(p_account, v_mperiod, p_now) END
    INTO v_frozen, v_avail, v_key_left, v_mleft
    FROM wallets w WHERE w.account_id = v_payer;
    IF v_frozen THEN
        RETURN QUERY SELECT false, 'wallet_frozen'::text, NULL::text, v_amount, v_avail,
            v_key_left, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT p_byok AND v_avail < v_amount THEN
        RETURN QUERY SELECT false, 'insufficient_credits'::text, NULL::text, v_amount, v_avail,
            v_key_left, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_has_limit AND v_key_left < v_amount THEN
        RETURN QUERY SELECT false, 'key_limit_exceeded'::text, NULL::text, v_amount, v_avail,
            v_key_left, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT p_byok AND v_mleft IS NOT NULL AND v_mleft < v_amount THEN
        RETURN QUERY SELECT false, 'member_limit_exceeded'::text, NULL::text, v_amount, v_avail,
            v_key_left, NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO holds (hold_id, account_id, api_key_id, model, provider, byok, amount,
                       created_at, expires_at, limit_period_start, member_account_id,
                       member_period_start)
    VALUES (p_hold_id, v_payer, p_key, p_model, p_provider, p_byok, v_amount,
            p_now, p_now + p_ttl, v_period, CASE WHEN v_is_member THEN p_account END,
            CASE WHEN p_byok THEN NULL ELSE v_mperiod END);
    RETURN QUERY SELECT true, 'held'::text, p_hold_id, v_amount,
        CASE WHEN p_byok THEN v_avail ELSE v_avail - v_amount END,
        v_key_left - v_amount, p_now + p_ttl;
END $$;

-- Credit grants: promotional or free credit with an expiry, kept apart from paid credit.
-- A grant is credited to the wallet (posting kind 'grant', from equity:grants); usage consumes the
-- credit that expires first, so grants before paid credit, the earliest expiry first
-- (grant_consumptions: which usage posting took what); at expiry what is left goes back to
-- equity:grants (posting kind 'grant_expiry'), exactly once. Refunds and disputes take back paid
-- credit only: they never touch a grant. Paid credit = balance - granted credit remaining.
INSERT INTO ledger_accounts (code, kind) VALUES ('equity:grants', 'equity');

ALTER TABLE postings DROP CONSTRAINT postings_kind_check;
ALTER TABLE postings ADD CONSTRAINT postings_kind_check CHECK (kind IN (
    'usage', 'adjustment',
    'topup', 'topup_refund', 'dispute_hold', 'dispute_release', 'dispute_loss',
    'grant', 'grant_expiry'));

-- "$5 every 30 days": the beat task issues each due grant once (grant_id = schedule_id:N).
CREATE TABLE grant_schedules (
    schedule_id  text PRIMARY KEY CHECK (length(schedule_id) BETWEEN 1 AND 150),
    account_id   text NOT NULL REFERENCES accounts,
    amount       numeric(38, 12) NOT NULL CHECK (amount > 0),
    every        interval NOT NULL CHECK (every >= interval '1 hour'),
    valid_for    interval NOT NULL CHECK (valid_for > interval '0'),
    reason       text NOT NULL,
    next_at      timestamptz NOT NULL,
    issued       integer NOT NULL DEFAULT 0,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text
);

CREATE TABLE credit_grants (
    grant_id           text PRIMARY KEY CHECK (length(grant_id) BETWEEN 1 AND 200),
    account_id         text NOT NULL REFERENCES accounts,
    amount             numeric(38, 12) NOT NULL CHECK (amount > 0),
    consumed           numeric(38, 12) NOT NULL DEFAULT 0,
    expired            numeric(38, 12) NOT NULL DEFAULT 0,
    granted_at         timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    expired_at         timestamptz,              -- set once, by the expiry
    reason             text NOT NULL,
    actor              text,
    schedule_id        text REFERENCES grant_schedules,
    grant_posting_id   bigint NOT NULL REFERENCES postings,
    expiry_posting_id  bigint REFERENCES postings DEFERRABLE INITIALLY DEFERRED,
    CHECK (expires_at > granted_at),
    CHECK (consumed >= 0 AND expired >= 0 AND consumed + expired <= amount),
    CHECK (expired_at IS NOT NULL OR expired = 0),
    CHECK ((expiry_posting_id IS NOT NULL) = (expired > 0))
);
CREATE INDEX credit_grants_open ON credit_grants (account_id, expires_at, grant_id)
    WHERE expired_at IS NULL;
CREATE INDEX credit_grants_due ON credit_grants (expires_at) WHERE expired_at IS NULL;
CREATE INDEX credit_grants_account ON credit_grants (account_id);  -- statements

-- Granted credit past its expiry that the expiry task has not moved out yet: not available.
CREATE FUNCTION billing_grants_lapsed(p_account text, p_now timestamptz)
RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(c.amount - c.consumed - c.expired), 0)::numeric(38, 12)
    FROM credit_grants c
    WHERE c.account_id = p_account AND c.expired_at IS NULL AND c.expires_at <= p_now
$$;

CREATE TABLE grant_consumptions (
    grant_id    text NOT NULL REFERENCES credit_grants,
    posting_id  bigint NOT NULL REFERENCES postings,
    amount      numeric(38, 12) NOT NULL CHECK (amount > 0),
    PRIMARY KEY (grant_id, posting_id)
);
CREATE INDEX grant_consumptions_posting ON grant_consumptions (posting_id);

-- Low-balance alerts: per account thresholds. `below` is the state last published: a crossing
-- from >= threshold to < threshold publishes wallet.low_balance once (and re-arms when the
-- balance is back at or above the threshold). Evaluated under the wallet's row lock by every
-- transaction that moves its balance (billing.wallets.record_crossings).
CREATE TABLE balance_alerts (
    account_id  text NOT NULL REFERENCES accounts,
    threshold   numeric(38, 12) NOT NULL CHECK (threshold > 0),
    below       boolean NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text,
    PRIMARY KEY (account_id, threshold)
);
