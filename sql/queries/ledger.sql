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
-- Row locks in account_id order, for a writer that must hold a wallet before it reads what the
-- wallet's posting depends on (billing.grants: the grants to expire). Returns each wallet's state.
SELECT account_id, state
FROM wallets
WHERE account_id = ANY(string_to_array(%(accounts)s, E'\n'))
ORDER BY account_id
FOR UPDATE

-- name: insert_entries
-- All entries of one posting in one statement: the balance trigger checks them together. Wallet
-- entries name their account; each wallet's ledger account (which never changes) is found here,
-- without a lock, so they are written before the wallets are locked. (Array parameters are
-- newline-separated texts: billing.db.text_array.)
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount)
SELECT %(posting_id)s::bigint,
       coalesce(w.ledger_account_id, billing_missing_wallet(d.account_id)), d.amount
FROM unnest(string_to_array(%(accounts)s, E'\n'),
            string_to_array(%(amounts)s, E'\n')::numeric[]) AS d(account_id, amount)
LEFT JOIN wallets w ON w.account_id = d.account_id
WHERE d.amount <> 0
UNION ALL
SELECT %(posting_id)s::bigint, s.ledger_account_id, s.amount
FROM unnest(string_to_array(%(system_accounts)s, E'\n')::bigint[],
            string_to_array(%(system_amounts)s, E'\n')::numeric[]) AS s(ledger_account_id, amount)
WHERE s.amount <> 0

-- name: debit_wallets
-- The wallet locks, in account_id order, and the new balances, in one pass (migration 0009).
-- Returns each wallet's new balance and state and the state it moved from.
SELECT account_id, balance, state, old_state
FROM billing_debit_wallets(%(accounts)s, %(amounts)s)
