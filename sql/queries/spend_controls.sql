-- name: after_usage_debit
-- The spend controls' part of a usage batch: ONE statement, in the batch transaction, after the
-- debit (the batch holds its wallets' row locks).
-- 1. Settle the holds named by the batch's new events: each takes its event's actual cost. A
--    hold that already expired is still settled (the usage happened). Holds in hold_id order.
--    A limited key's (and a limited member's) period spend grows by the cost of EVERY new event
--    of it, held or not, in the period its event occurred in (usage per 15-minute bucket of
--    occurred_at: every time zone's midnight falls on one); spend rows in key order.
-- 2. Usage consumes granted credit first, the earliest expiry first (d = each wallet's debit).
-- 3. Record what an organisation's wallet paid for each member's usage (attribution).
-- 4. Flip the low-balance alert thresholds the new balances crossed; return the downward ones
--    (amounts as text: exact) for the caller's outbox rows.
WITH s AS (
    SELECT * FROM unnest(%(hold_ids)s::text[], %(event_ids)s::text[], %(hold_accounts)s::text[],
                         %(hold_amounts)s::numeric[]) AS s(hold_id, event_id, account_id, amount)
    ORDER BY hold_id
), settled AS (
    UPDATE holds h
    SET status = 'settled', closed_at = now(), settled_event_id = s.event_id,
        settled_amount = s.amount, close_reason = NULL
    FROM s
    WHERE h.hold_id = s.hold_id AND coalesce(h.member_account_id, h.account_id) = s.account_id
      AND h.status IN ('active', 'expired')
    RETURNING h.hold_id
), ku AS (
    SELECT * FROM unnest(%(key_ids)s::text[], %(key_accounts)s::text[], %(key_at)s::timestamptz[],
                         %(key_paid)s::numeric[], %(key_byok)s::numeric[])
        AS ku(api_key_id, account_id, at, paid, byok)
), spend AS (
    INSERT INTO key_spend (api_key_id, period_start, spent)
    SELECT ku.api_key_id, billing_limit_period_start(l.period, l.time_zone, ku.at),
           sum(ku.paid + CASE WHEN l.count_byok THEN ku.byok ELSE 0 END)
    FROM ku JOIN key_limits l ON l.api_key_id = ku.api_key_id AND l.account_id = ku.account_id
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (api_key_id, period_start) DO UPDATE SET spent = key_spend.spent + excluded.spent
), mu AS (
    SELECT * FROM unnest(%(spend_members)s::text[], %(spend_member_at)s::timestamptz[],
                         %(spend_member_amounts)s::numeric[]) AS mu(member, at, amount)
), member_spent AS (
    INSERT INTO member_spend (member_account_id, period_start, spent)
    SELECT mu.member, billing_limit_period_start(m.limit_period, m.time_zone, mu.at),
           sum(mu.amount)
    FROM mu JOIN account_members m ON m.member_account_id = mu.member
    WHERE m.limit_amount IS NOT NULL
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (member_account_id, period_start)
        DO UPDATE SET spent = member_spend.spent + excluded.spent
), d AS (
    SELECT * FROM unnest(string_to_array(%(accounts)s, E'\n'),
                         string_to_array(%(debits)s, E'\n')::numeric[]) AS d(account_id, amount)
), g AS (
    SELECT c.grant_id, c.account_id, c.amount - c.consumed - c.expired AS remaining,
           sum(c.amount - c.consumed - c.expired)
               OVER (PARTITION BY c.account_id ORDER BY c.expires_at, c.grant_id) AS upto
    FROM credit_grants c JOIN d USING (account_id)
    WHERE c.expired_at IS NULL AND c.expires_at > now() AND c.consumed + c.expired < c.amount
), take AS (
    SELECT g.grant_id, least(g.remaining, greatest(d.amount - (g.upto - g.remaining), 0)) AS amount
    FROM g JOIN d USING (account_id)
), consumed AS (
    UPDATE credit_grants c SET consumed = c.consumed + t.amount
    FROM take t WHERE c.grant_id = t.grant_id AND t.amount > 0
    RETURNING c.grant_id
), consumption AS (
    INSERT INTO grant_consumptions (grant_id, posting_id, amount)
    SELECT grant_id, %(posting_id)s, amount FROM take WHERE amount > 0
    RETURNING amount
), attributed AS (
    INSERT INTO usage_attributions (posting_id, member_account_id, payer_account_id, amount)
    SELECT %(posting_id)s, m.member, m.payer, m.amount
    FROM unnest(%(members)s::text[], %(member_payers)s::text[], %(member_amounts)s::numeric[])
        AS m(member, payer, amount)
), changed AS (
    SELECT * FROM unnest(%(changed_accounts)s::text[], %(changed_balances)s::numeric[])
        AS c(account_id, balance)
), flipped AS (
    UPDATE balance_alerts a
    SET below = c.balance < a.threshold, changed_at = now()
    FROM changed c
    WHERE a.account_id = c.account_id AND a.below <> (c.balance < a.threshold)
    RETURNING a.account_id, a.threshold, a.below, c.balance
)
SELECT (SELECT count(*) FROM settled) AS settled_holds,
       (SELECT coalesce(sum(amount), 0) FROM consumption) AS granted_used,
       (SELECT coalesce(json_agg(json_build_array(
                   f.account_id, f.threshold::text, f.balance::text,
                   EXISTS (SELECT 1 FROM auto_topup_settings t
                           WHERE t.account_id = f.account_id AND t.enabled))
                   ORDER BY f.account_id, f.threshold DESC), '[]')
          FROM flipped f WHERE f.below) AS crossed

-- name: batch_payers
-- The batch's known accounts, the wallet that pays for each (its own, or its organisation's),
-- and which spend controls apply, so that the batch sends the spend-controls statement only
-- what it needs (most accounts have none): the account's limited keys, whether it is a member
-- with a limit, whether its paying wallet has balance alerts. (Grants are decided under the
-- wallet lock, in after_usage_debit.)
SELECT a.account_id, p.payer,
       ARRAY(SELECT l.api_key_id FROM key_limits l WHERE l.account_id = a.account_id)
           AS limited_keys,
       m.limit_amount IS NOT NULL AS member_limited,
       EXISTS (SELECT 1 FROM balance_alerts b WHERE b.account_id = p.payer) AS has_alerts
FROM accounts a
LEFT JOIN account_members m ON m.member_account_id = a.account_id
CROSS JOIN LATERAL (SELECT coalesce(m.org_account_id, a.account_id) AS payer) p
WHERE a.account_id = ANY(string_to_array(%(accounts)s, E'\n'))

-- name: lock_member_accounts
-- Both accounts of a membership change, locked in id order: the one-level rule below reads other
-- rows (NOT EXISTS), which a concurrent add would not see before it commits; two adds that could
-- form a cycle or a chain share an account, so they run one after the other.
SELECT account_id FROM accounts WHERE account_id = ANY(%(accounts)s)
ORDER BY account_id
FOR NO KEY UPDATE

-- name: upsert_member
-- A member of exactly one organisation; an organisation is never a member and vice versa.
INSERT INTO account_members (member_account_id, org_account_id, limit_amount, limit_period,
                             time_zone, added_by)
SELECT %(member)s, %(org)s, %(limit_amount)s, %(limit_period)s, %(time_zone)s, %(actor)s
WHERE NOT EXISTS (SELECT 1 FROM account_members WHERE org_account_id = %(member)s)
  AND NOT EXISTS (SELECT 1 FROM account_members WHERE member_account_id = %(org)s)
ON CONFLICT (member_account_id) DO UPDATE
SET limit_amount = excluded.limit_amount, limit_period = excluded.limit_period,
    time_zone = excluded.time_zone, updated_at = now()
WHERE account_members.org_account_id = excluded.org_account_id
RETURNING member_account_id

-- name: rebuild_member_spend
-- A limited member's spend in its current period, from its recorded events that an organisation
-- paid (usage_attributions), as the usage batches count it: for usage before the limit existed,
-- or in another zone or period. The caller holds the paying wallet's lock (holds.sql
-- lock_paying_wallet): a batch adds to member_spend while it holds it.
WITH m AS (
    SELECT m.*, billing_limit_period_start(m.limit_period, m.time_zone, %(now)s) AS period_start
    FROM account_members m
    WHERE m.member_account_id = %(member)s AND m.limit_amount IS NOT NULL
)
INSERT INTO member_spend (member_account_id, period_start, spent)
SELECT m.member_account_id, m.period_start, coalesce(sum(u.debited), 0)
FROM m
LEFT JOIN usage_events u
       ON u.account_id = m.member_account_id AND NOT u.byok AND u.debited > 0
      AND u.recorded_at >= m.period_start - interval '1 day'
      AND u.occurred_at >= m.period_start
      AND billing_limit_period_start(m.limit_period, m.time_zone, u.occurred_at) = m.period_start
      AND EXISTS (SELECT 1 FROM usage_attributions a
                  WHERE a.posting_id = u.posting_id AND a.member_account_id = u.account_id)
GROUP BY m.member_account_id, m.period_start
ON CONFLICT (member_account_id, period_start) DO UPDATE SET spent = excluded.spent

-- name: remove_member
DELETE FROM account_members WHERE member_account_id = %(member)s AND org_account_id = %(org)s
RETURNING member_account_id

-- name: list_members
SELECT m.member_account_id, m.org_account_id, m.limit_amount, m.limit_period, m.time_zone,
       CASE WHEN m.limit_period IS NOT NULL THEN billing_member_used(
           m.member_account_id,
           billing_limit_period_start(m.limit_period, m.time_zone, %(now)s), %(now)s) END AS used,
       m.added_at
FROM account_members m
WHERE (%(org)s::text IS NULL OR m.org_account_id = %(org)s)
ORDER BY m.org_account_id, m.member_account_id
