-- name: find_grant
SELECT grant_id, account_id, amount, expires_at FROM credit_grants WHERE grant_id = %(grant_id)s

-- name: insert_grant
INSERT INTO credit_grants (grant_id, account_id, amount, granted_at, expires_at, reason, actor,
                           schedule_id, grant_posting_id)
VALUES (%(grant_id)s, %(account_id)s, %(amount)s, %(granted_at)s, %(expires_at)s, %(reason)s,
        %(actor)s, %(schedule_id)s, %(posting_id)s)

-- name: lapsed_grant_accounts
SELECT DISTINCT account_id FROM credit_grants
WHERE expired_at IS NULL AND expires_at <= %(now)s
ORDER BY account_id
LIMIT %(limit)s

-- name: expire_account_grants
-- Under the wallet's row lock: close the account's lapsed grants once. A second scheduler that
-- waited for the lock finds them closed (expired_at is re-checked) and closes nothing.
UPDATE credit_grants
SET expired = amount - consumed, expired_at = %(now)s,
    expiry_posting_id = CASE WHEN amount - consumed > 0 THEN %(posting_id)s::bigint END
WHERE account_id = %(account_id)s AND expired_at IS NULL AND expires_at <= %(now)s
RETURNING grant_id, expired

-- name: list_grants
SELECT grant_id, account_id, amount, consumed, expired, amount - consumed - expired AS remaining,
       granted_at, expires_at, expired_at, reason, schedule_id
FROM credit_grants
WHERE (%(account_id)s::text IS NULL OR account_id = %(account_id)s)
ORDER BY account_id, expires_at, grant_id
LIMIT %(limit)s

-- name: granted_balance
-- Paid and granted credit of a wallet: granted = what its open grants have left.
SELECT w.account_id, w.balance,
       coalesce((SELECT sum(c.amount - c.consumed - c.expired) FROM credit_grants c
                  WHERE c.account_id = w.account_id AND c.expired_at IS NULL), 0) AS granted
FROM wallets w WHERE w.account_id = %(account_id)s

-- name: upsert_grant_schedule
INSERT INTO grant_schedules (schedule_id, account_id, amount, every, valid_for, reason, next_at,
                             created_by)
VALUES (%(schedule_id)s, %(account_id)s, %(amount)s, %(every)s, %(valid_for)s, %(reason)s,
        %(next_at)s, %(actor)s)
ON CONFLICT (schedule_id) DO UPDATE
SET amount = excluded.amount, every = excluded.every, valid_for = excluded.valid_for,
    reason = excluded.reason, enabled = true
WHERE grant_schedules.account_id = excluded.account_id
RETURNING schedule_id

-- name: claim_due_schedule
-- One due schedule at a time; SKIP LOCKED lets several beat schedulers share the work.
SELECT schedule_id, account_id, amount, every, valid_for, reason, next_at, issued
FROM grant_schedules
WHERE enabled AND next_at <= %(now)s
ORDER BY next_at, schedule_id
LIMIT 1
FOR UPDATE SKIP LOCKED

-- name: advance_schedule
UPDATE grant_schedules SET issued = issued + 1, next_at = next_at + every
WHERE schedule_id = %(schedule_id)s

-- name: audit_grant_ledger
-- Each grant's posting moved exactly its amount into its wallet, and each expiry posting moved
-- out exactly what the grants it closed had left.
SELECT 'grant ' || c.grant_id AS item, c.amount AS expected, coalesce(sum(e.amount), 0) AS posted
FROM credit_grants c JOIN wallets w USING (account_id)
LEFT JOIN ledger_entries e ON e.posting_id = c.grant_posting_id
                          AND e.ledger_account_id = w.ledger_account_id
GROUP BY c.grant_id, c.amount
HAVING coalesce(sum(e.amount), 0) <> c.amount
UNION ALL
SELECT 'expiry posting ' || p.posting_id, coalesce(x.expired, 0), coalesce(-sum(e.amount), 0)
FROM postings p
LEFT JOIN (SELECT expiry_posting_id, sum(expired) AS expired FROM credit_grants
           WHERE expiry_posting_id IS NOT NULL GROUP BY expiry_posting_id) x
    ON x.expiry_posting_id = p.posting_id
LEFT JOIN ledger_entries e ON e.posting_id = p.posting_id
                          AND e.ledger_account_id IN (SELECT ledger_account_id FROM wallets)
WHERE p.kind = 'grant_expiry'
GROUP BY p.posting_id, x.expired
HAVING coalesce(-sum(e.amount), 0) <> coalesce(x.expired, 0)
ORDER BY 1

-- name: audit_grant_consumption
-- A grant's consumed amount is the sum of its consumptions, each taken by a usage posting, and a
-- usage posting never took more granted credit from a wallet than it debited that wallet.
SELECT c.grant_id, c.consumed, coalesce(s.total, 0) AS consumptions
FROM credit_grants c
LEFT JOIN (SELECT grant_id, sum(amount) AS total FROM grant_consumptions GROUP BY grant_id) s
    USING (grant_id)
WHERE c.consumed <> coalesce(s.total, 0)
UNION ALL
SELECT 'posting ' || gc.posting_id || ' / ' || c.account_id, sum(gc.amount),
       coalesce(max(d.debited), 0)
FROM grant_consumptions gc JOIN credit_grants c USING (grant_id)
LEFT JOIN LATERAL (
    SELECT -sum(e.amount) AS debited FROM ledger_entries e
    JOIN postings p USING (posting_id) JOIN wallets w USING (ledger_account_id)
    WHERE e.posting_id = gc.posting_id AND w.account_id = c.account_id AND p.kind = 'usage'
) d ON true
GROUP BY gc.posting_id, c.account_id
HAVING sum(gc.amount) > coalesce(max(d.debited), 0)
ORDER BY 1

-- name: audit_grants_equity
-- equity:grants holds minus what was granted plus what expired.
SELECT (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
          JOIN ledger_accounts a USING (ledger_account_id) WHERE a.code = 'equity:grants')
           AS ledger,
       (SELECT coalesce(sum(expired) - sum(amount), 0) FROM credit_grants) AS grants
WHERE (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
         JOIN ledger_accounts a USING (ledger_account_id) WHERE a.code = 'equity:grants')
   <> (SELECT coalesce(sum(expired) - sum(amount), 0) FROM credit_grants)
