-- name: next_posting_id
SELECT nextval('posting_ids')

-- name: insert_posting
INSERT INTO postings (posting_id, kind, reference, memo, actor)
VALUES (%(posting_id)s, %(kind)s, %(reference)s, %(memo)s, %(actor)s)

-- name: find_posting_by_reference
SELECT posting_id FROM postings WHERE kind = %(kind)s AND reference = %(reference)s

-- name: ledger_account_id
SELECT ledger_account_id FROM ledger_accounts WHERE code = %(code)s

-- name: wallet_ledger_accounts
-- Each wallet's ledger account, without a lock: it never changes, so a posting's entries can be
-- written before its wallets are locked. (Array parameters here are newline-separated texts:
-- billing.db.text_array.)
SELECT account_id, ledger_account_id
FROM wallets
WHERE account_id = ANY(string_to_array(%(accounts)s, E'\n'))

-- name: lock_wallets
-- Row locks in account_id order: every writer locks wallets in this order, so parallel workers
-- never deadlock on each other's wallets. Returns each wallet's state before the update.
SELECT account_id, state
FROM wallets
WHERE account_id = ANY(string_to_array(%(accounts)s, E'\n'))
ORDER BY account_id
FOR UPDATE

-- name: update_wallet_balances
UPDATE wallets AS w
SET balance = w.balance + d.amount,
    state = CASE WHEN w.balance + d.amount > 0 THEN 'active' ELSE 'exhausted' END,
    updated_at = now()
FROM unnest(string_to_array(%(accounts)s, E'\n'),
            string_to_array(%(amounts)s, E'\n')::numeric[]) AS d(account_id, amount)
WHERE w.account_id = d.account_id
RETURNING w.account_id, w.balance, w.state

-- name: insert_entries
-- All entries of one posting in one statement: the balance trigger checks them together.
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount)
SELECT %(posting_id)s, e.ledger_account_id, e.amount
FROM unnest(string_to_array(%(ledger_accounts)s, E'\n')::bigint[],
            string_to_array(%(amounts)s, E'\n')::numeric[]) AS e(ledger_account_id, amount)
WHERE e.amount <> 0
