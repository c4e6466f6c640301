-- name: next_posting_id
SELECT nextval('posting_ids')

-- name: insert_posting
INSERT INTO postings (posting_id, kind, reference, memo, actor)
VALUES (%(posting_id)s, %(kind)s, %(reference)s, %(memo)s, %(actor)s)

-- name: find_posting_by_reference
SELECT posting_id FROM postings WHERE kind = %(kind)s AND reference = %(reference)s

-- name: ledger_account_id
SELECT ledger_account_id FROM ledger_accounts WHERE code = %(code)s

-- name: lock_wallets
-- Row locks in account_id order: every writer locks wallets in this order, so parallel workers
-- never deadlock on each other's wallets.
SELECT account_id, ledger_account_id, balance, state
FROM wallets
WHERE account_id = ANY(%(accounts)s)
ORDER BY account_id
FOR UPDATE

-- name: update_wallet_balances
UPDATE wallets AS w
SET balance = w.balance + d.amount,
    state = CASE WHEN w.balance + d.amount > 0 THEN 'active' ELSE 'exhausted' END,
    updated_at = now()
FROM unnest(%(accounts)s::text[], %(amounts)s::numeric[]) AS d(account_id, amount)
WHERE w.account_id = d.account_id
RETURNING w.account_id, w.balance, w.state

-- name: insert_entries
-- All entries of one posting in one statement: the balance trigger checks them together.
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount)
SELECT %(posting_id)s, e.ledger_account_id, e.amount
FROM unnest(%(ledger_accounts)s::bigint[], %(amounts)s::numeric[]) AS e(ledger_account_id, amount)
WHERE e.amount <> 0
