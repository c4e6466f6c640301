-- name: flip_balance_alerts
-- The alerts of these wallets whose state changes with their new balances (wallet rows locked
-- by the caller's transaction). Returns the flipped rows, with whether an auto top-up is set up.
WITH c AS (
    SELECT * FROM unnest(%(accounts)s::text[], %(balances)s::numeric[]) AS c(account_id, balance)
)
UPDATE balance_alerts a
SET below = c.balance < a.threshold, changed_at = now()
FROM c
WHERE a.account_id = c.account_id AND a.below <> (c.balance < a.threshold)
RETURNING a.account_id, a.threshold, a.below, c.balance,
          EXISTS (SELECT 1 FROM auto_topup_settings t
                  WHERE t.account_id = a.account_id AND t.enabled) AS auto_topup

-- name: set_balance_alert
-- A new threshold starts in the state of the current balance: no alert for being already below.
-- Under the wallet's lock: a usage batch in flight flips thresholds with the balance it commits,
-- and would not see this row; read before its commit, the balance would leave a new threshold
-- "above" under a balance already below it, and its alert would never come.
INSERT INTO balance_alerts (account_id, threshold, below, created_by)
SELECT w.account_id, %(threshold)s, w.balance < %(threshold)s, %(actor)s
FROM wallets w WHERE w.account_id = %(account_id)s
FOR UPDATE
ON CONFLICT (account_id, threshold) DO NOTHING
RETURNING account_id

-- name: remove_balance_alert
DELETE FROM balance_alerts WHERE account_id = %(account_id)s AND threshold = %(threshold)s
RETURNING account_id

-- name: list_balance_alerts
SELECT a.account_id, a.threshold, a.below, a.changed_at, w.balance
FROM balance_alerts a JOIN wallets w USING (account_id)
WHERE (%(account_id)s::text IS NULL OR a.account_id = %(account_id)s)
ORDER BY a.account_id, a.threshold
