-- Two rules of billing_authorize, 0005's function with two changes (the rest as it was).
--
-- 1. Granted credit backs a hold only if it outlives the hold. The available balance was
--    balance - held - billing_grants_lapsed(payer, now), so promo credit expiring a second later
--    still backed a hold that lasts BILLING_HOLD_TTL (15 minutes). The expiry task then took
--    that credit out of the wallet, and the usage the hold had allowed was debited from nothing:
--    the balance went below zero although every request went through a hold and stayed within
--    it. Now the credit of grants that lapse before now + ttl is left out, as lapsed credit
--    already was.
-- 2. A retried authorization returns its hold only while that hold is active. A call with a
--    hold_id already used answered allowed / 'existing' whatever the hold had become. Settled,
--    released or expired, the hold reserves nothing: a gateway that sent a request id again (a
--    late retry after a release, or an id reused) was told to dispatch with no credit held,
--    past the insufficient-credits check, so concurrent holds could exceed the balance. Such a
--    call now answers allowed = false, 'hold_closed' (HTTP 409); the gateway authorizes the new
--    attempt under a new hold_id.

CREATE OR REPLACE FUNCTION billing_authorize(
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
        IF v_old.status <> 'active' OR v_old.expires_at <= p_now THEN
            -- settled, released or expired: it reserves nothing any more
            RETURN QUERY SELECT false, 'hold_closed'::text, v_old.hold_id, v_old.amount,
                NULL::numeric, NULL::numeric, v_old.expires_at;
            RETURN;
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
           w.balance - billing_wallet_held(v_payer, p_now)
             - billing_grants_lapsed(v_payer, p_now + p_ttl),  -- lapsed before this hold ends
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
