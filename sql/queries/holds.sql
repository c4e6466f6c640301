-- name: authorize
-- The gateway's one round trip (see billing_authorize in migration 0005).
SELECT allowed, reason, hold_id, amount, available, key_remaining, expires_at
FROM billing_authorize(%(hold_id)s, %(account_id)s, %(api_key_id)s, %(model)s, %(provider)s,
                       %(byok)s, %(amount)s, %(use_ceiling)s, %(ttl)s, %(now)s)

-- name: expire_holds
-- Close active holds past their expiry (the beat task). SKIP LOCKED: several schedulers may run
-- at once, and a hold being settled is left to its settlement.
UPDATE holds h
SET status = 'expired', closed_at = %(now)s, close_reason = 'expired'
WHERE h.hold_id IN (
    SELECT hold_id FROM holds
    WHERE status = 'active' AND expires_at <= %(now)s
    ORDER BY hold_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
RETURNING h.hold_id

-- name: release_hold
-- The gateway did not dispatch the request (or an operator releases it): nothing to settle.
UPDATE holds
SET status = 'released', closed_at = %(now)s, close_reason = %(reason)s
WHERE hold_id = %(hold_id)s AND status = 'active'
RETURNING hold_id, account_id, amount

-- name: hold_by_id
SELECT hold_id, account_id, api_key_id, model, provider, byok, amount, status, created_at,
       expires_at, limit_period_start, closed_at, settled_event_id, settled_amount, close_reason
FROM holds WHERE hold_id = %(hold_id)s

-- name: list_holds
SELECT hold_id, account_id, api_key_id, model, provider, byok, amount, status, created_at,
       expires_at, limit_period_start, closed_at, settled_event_id, settled_amount, close_reason
FROM holds
WHERE (%(account_id)s::text IS NULL OR account_id = %(account_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
ORDER BY created_at DESC, hold_id
LIMIT %(limit)s

-- name: wallet_availability
-- available = balance - held - granted credit already lapsed (its expiry not yet posted).
SELECT w.account_id, w.balance, billing_wallet_held(w.account_id, %(now)s) AS held,
       billing_grants_lapsed(w.account_id, %(now)s) AS lapsed,
       w.balance - billing_wallet_held(w.account_id, %(now)s)
                 - billing_grants_lapsed(w.account_id, %(now)s) AS available
FROM wallets w WHERE w.account_id = %(account_id)s

-- name: set_hold_ceiling
INSERT INTO hold_ceilings (model, amount, updated_by) VALUES (%(model)s, %(amount)s, %(actor)s)
ON CONFLICT (model) DO UPDATE
SET amount = excluded.amount, updated_at = now(), updated_by = excluded.updated_by

-- name: list_hold_ceilings
SELECT model, amount, updated_at, updated_by FROM hold_ceilings ORDER BY model

-- name: set_key_limit
-- A period, zone or BYOK rule not given (NULL) keeps the limit's current one; a new limit gets
-- the defaults (month, UTC, BYOK not counted).
INSERT INTO key_limits (api_key_id, account_id, amount, period, time_zone, count_byok, updated_by)
VALUES (%(api_key_id)s, %(account_id)s, %(amount)s, coalesce(%(period)s, 'month'),
        coalesce(%(time_zone)s, 'UTC'), coalesce(%(count_byok)s, false), %(actor)s)
ON CONFLICT (api_key_id) DO UPDATE
SET amount = excluded.amount, period = coalesce(%(period)s, key_limits.period),
    time_zone = coalesce(%(time_zone)s, key_limits.time_zone),
    count_byok = coalesce(%(count_byok)s, key_limits.count_byok),
    updated_at = now(), updated_by = excluded.updated_by
WHERE key_limits.account_id = excluded.account_id
RETURNING api_key_id, period, time_zone, count_byok

-- name: lock_paying_wallet
-- The wallet that pays an account's usage (its own, or its organisation's), locked: a usage batch
-- adds to key_spend while it holds that lock, so a rebuild under it loses no batch's spend.
SELECT w.account_id FROM wallets w
WHERE w.account_id = coalesce(
    (SELECT m.org_account_id FROM account_members m WHERE m.member_account_id = %(account_id)s),
    %(account_id)s)
FOR UPDATE

-- name: rebuild_key_spend
-- A key's spend in its current period, from its recorded events: what the usage batches add
-- event by event (the debit, and the notional cost of BYOK events when they count), but also for
-- events recorded before the limit existed or was cut this way (another period or zone). An event
-- occurred at most the clock skew before it was recorded, so a day's margin on recorded_at finds
-- every event of the period through the (account_id, recorded_at) index.
WITH l AS (
    SELECT l.*, billing_limit_period_start(l.period, l.time_zone, %(now)s) AS period_start
    FROM key_limits l WHERE l.api_key_id = %(api_key_id)s
)
INSERT INTO key_spend (api_key_id, period_start, spent)
SELECT l.api_key_id, l.period_start,
       coalesce(sum(u.debited + CASE WHEN l.count_byok AND u.byok THEN u.amount ELSE 0 END), 0)
FROM l
LEFT JOIN usage_events u
       ON u.account_id = l.account_id AND u.api_key_id = l.api_key_id
      AND u.recorded_at >= l.period_start - interval '1 day'
      AND u.occurred_at >= l.period_start
      AND billing_limit_period_start(l.period, l.time_zone, u.occurred_at) = l.period_start
GROUP BY l.api_key_id, l.period_start
ON CONFLICT (api_key_id, period_start) DO UPDATE SET spent = excluded.spent
RETURNING spent

-- name: remove_key_limit
DELETE FROM key_limits WHERE api_key_id = %(api_key_id)s RETURNING api_key_id

-- name: show_key_limit
SELECT l.api_key_id, l.account_id, l.amount, l.period, l.time_zone, l.count_byok,
       billing_limit_period_start(l.period, l.time_zone, %(now)s) AS period_start,
       billing_limit_period_end(l.period, l.time_zone, %(now)s) AS period_end,
       billing_key_used(l.api_key_id, billing_limit_period_start(l.period, l.time_zone, %(now)s),
                        %(now)s) AS used
FROM key_limits l
WHERE (%(api_key_id)s::text IS NULL OR l.api_key_id = %(api_key_id)s)
  AND (%(account_id)s::text IS NULL OR l.account_id = %(account_id)s)
ORDER BY l.account_id, l.api_key_id

-- name: audit_hold_availability
-- held + available (+ lapsed grants) = balance for every wallet: the authorization's arithmetic
-- (billing_wallet_held, billing_grants_lapsed) against independent sums of the active holds and
-- of the lapsed grants; and no hold is on a missing wallet.
SELECT w.account_id, w.balance, billing_wallet_held(w.account_id, now()) AS held,
       coalesce(h.held, 0) AS independent_held,
       billing_grants_lapsed(w.account_id, now()) AS lapsed, coalesce(g.lapsed, 0) AS independent_lapsed
FROM wallets w
LEFT JOIN (SELECT account_id, sum(amount) AS held FROM holds
           WHERE status = 'active' AND NOT byok AND expires_at > now()
           GROUP BY account_id) h USING (account_id)
LEFT JOIN (SELECT account_id, sum(amount - consumed - expired) AS lapsed FROM credit_grants
           WHERE expired_at IS NULL AND expires_at <= now()
           GROUP BY account_id) g USING (account_id)
WHERE (w.balance - billing_wallet_held(w.account_id, now())
                 - billing_grants_lapsed(w.account_id, now()))
      + coalesce(h.held, 0) + coalesce(g.lapsed, 0) <> w.balance
UNION ALL
SELECT h.account_id, NULL, h.amount, NULL, NULL, NULL
FROM holds h LEFT JOIN wallets w USING (account_id)
WHERE w.account_id IS NULL
ORDER BY 1

-- name: audit_settled_holds
-- A settled hold took exactly its event's cost: the event is recorded, on the same account, and
-- its amount (debited, or the notional cost of a BYOK hold) is the settled amount.
SELECT h.hold_id, h.account_id, h.settled_event_id, h.settled_amount,
       u.account_id AS event_account, u.amount AS event_amount
FROM holds h LEFT JOIN usage_events u ON u.event_id = h.settled_event_id
WHERE h.status = 'settled'
  AND (u.event_id IS NULL OR u.account_id <> coalesce(h.member_account_id, h.account_id)
       OR u.amount <> h.settled_amount)
ORDER BY h.hold_id
LIMIT 1000

-- name: audit_key_spend
-- A limited key's spend in each period is the cost of the key's events that occurred in it (BYOK
-- counted when the limit says so), whether or not they came through a hold. Checked for the
-- periods that began after the limit was last set: a period that straddles a change of the
-- limit's period or time zone follows the configuration of its time and is not compared.
WITH l AS (
    SELECT * FROM key_limits
), ev AS (
    SELECT l.api_key_id, billing_limit_period_start(l.period, l.time_zone, u.occurred_at) AS p,
           sum(CASE WHEN u.byok AND NOT l.count_byok THEN 0 ELSE u.amount END) AS total
    FROM l JOIN usage_events u ON u.api_key_id = l.api_key_id AND u.account_id = l.account_id
    WHERE u.recorded_at >= l.updated_at
    GROUP BY 1, 2
)
SELECT coalesce(ev.api_key_id, k.api_key_id) AS api_key_id,
       coalesce(ev.p, k.period_start) AS period_start,
       coalesce(ev.total, 0) AS events_total, coalesce(k.spent, 0) AS key_spend
FROM ev FULL JOIN (SELECT k.* FROM key_spend k JOIN l USING (api_key_id)) k
    ON k.api_key_id = ev.api_key_id AND k.period_start = ev.p
JOIN l ON l.api_key_id = coalesce(ev.api_key_id, k.api_key_id)
WHERE coalesce(ev.p, k.period_start) >= l.updated_at
  AND coalesce(ev.total, 0) <> coalesce(k.spent, 0)
ORDER BY 1, 2

-- name: audit_member_spend
-- A limited member's spend in each period is the cost of its (non-BYOK) events that occurred in
-- it, with the same rule as audit_key_spend for periods straddling a change of the limit.
WITH m AS (
    SELECT * FROM account_members WHERE limit_amount IS NOT NULL
), ev AS (
    SELECT m.member_account_id,
           billing_limit_period_start(m.limit_period, m.time_zone, u.occurred_at) AS p,
           sum(u.amount) AS total
    FROM m JOIN usage_events u ON u.account_id = m.member_account_id AND NOT u.byok
    WHERE u.recorded_at >= m.updated_at
    GROUP BY 1, 2
)
SELECT coalesce(ev.member_account_id, k.member_account_id) AS member_account_id,
       coalesce(ev.p, k.period_start) AS period_start,
       coalesce(ev.total, 0) AS events_total, coalesce(k.spent, 0) AS member_spend
FROM ev FULL JOIN (SELECT k.* FROM member_spend k JOIN m USING (member_account_id)) k
    ON k.member_account_id = ev.member_account_id AND k.period_start = ev.p
JOIN m ON m.member_account_id = coalesce(ev.member_account_id, k.member_account_id)
WHERE coalesce(ev.p, k.period_start) >= m.updated_at
  AND coalesce(ev.total, 0) <> coalesce(k.spent, 0)
ORDER BY 1, 2

-- name: audit_usage_attributions
-- What an organisation paid for a member in a usage posting is exactly the member's events in it.
SELECT ua.posting_id, ua.member_account_id, ua.amount, coalesce(sum(u.debited), 0) AS events_total
FROM usage_attributions ua
LEFT JOIN usage_events u ON u.posting_id = ua.posting_id AND u.account_id = ua.member_account_id
GROUP BY ua.posting_id, ua.member_account_id, ua.amount
HAVING ua.amount <> coalesce(sum(u.debited), 0)
ORDER BY 1, 2
