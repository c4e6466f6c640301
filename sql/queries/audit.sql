-- name: audit_wallet_vs_ledger
-- A wallet's balance must equal the sum of its ledger entries.
SELECT w.account_id, w.balance, coalesce(e.total, 0) AS ledger_sum
FROM wallets w
LEFT JOIN (SELECT ledger_account_id, sum(amount) AS total FROM ledger_entries
           GROUP BY ledger_account_id) e USING (ledger_account_id)
WHERE w.balance <> coalesce(e.total, 0)
ORDER BY w.account_id

-- name: audit_unbalanced_postings
-- Every posting has entries and they sum to zero.
SELECT p.posting_id, p.kind, coalesce(sum(e.amount), 0) AS total, count(e.entry_id) AS entries
FROM postings p LEFT JOIN ledger_entries e USING (posting_id)
GROUP BY p.posting_id, p.kind
HAVING count(e.entry_id) = 0 OR sum(e.amount) <> 0
ORDER BY p.posting_id

-- name: audit_usage_debits
-- Per usage posting and wallet, the ledger debit equals the sum of the events that reference it:
-- each accepted event's amount is in the ledger exactly once.
WITH ev AS (
    SELECT posting_id, account_id, sum(debited) AS debited
    FROM usage_events WHERE posting_id IS NOT NULL
    GROUP BY posting_id, account_id
), en AS (
    SELECT e.posting_id, w.account_id, -sum(e.amount) AS debited
    FROM ledger_entries e
    JOIN postings p USING (posting_id)
    JOIN wallets w USING (ledger_account_id)
    WHERE p.kind = 'usage'
    GROUP BY e.posting_id, w.account_id
)
SELECT coalesce(ev.posting_id, en.posting_id) AS posting_id,
       coalesce(ev.account_id, en.account_id) AS account_id,
       coalesce(ev.debited, 0) AS events_total, coalesce(en.debited, 0) AS ledger_total
FROM ev FULL JOIN en ON ev.posting_id = en.posting_id AND ev.account_id = en.account_id
WHERE coalesce(ev.debited, 0) <> coalesce(en.debited, 0)
ORDER BY 1, 2

-- name: audit_event_postings
-- Every debited event references an existing usage posting (no foreign key on the hot table).
SELECT u.event_id, u.posting_id
FROM usage_events u LEFT JOIN postings p ON p.posting_id = u.posting_id
WHERE u.posting_id IS NOT NULL AND (p.posting_id IS NULL OR p.kind <> 'usage')
ORDER BY u.event_id
LIMIT 1000

-- name: audit_event_accounts
-- Every recorded event belongs to an existing account.
SELECT u.event_id, u.account_id
FROM usage_events u LEFT JOIN accounts a USING (account_id)
WHERE a.account_id IS NULL
ORDER BY u.event_id
LIMIT 1000

-- name: audit_revenue
-- Usage revenue equals everything wallets were debited for usage.
SELECT (SELECT coalesce(sum(debited), 0) FROM usage_events) AS events_total,
       (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
          JOIN ledger_accounts a USING (ledger_account_id)
         WHERE a.code = 'revenue:usage') AS revenue_total

-- name: audit_recorded_and_parked
-- An event is in exactly one state: recorded (debited or BYOK) or parked, never both.
SELECT d.dead_letter_id, d.event_id, d.reason_code
FROM dead_letters d JOIN usage_events u ON u.event_id = d.event_id
WHERE d.status = 'parked'
ORDER BY d.dead_letter_id

-- name: audit_event_states
SELECT
    (SELECT count(*) FROM usage_events WHERE NOT byok) AS debited,
    (SELECT count(*) FROM usage_events WHERE byok) AS byok,
    (SELECT count(*) FROM dead_letters WHERE status = 'parked' AND reason_code = 'unpriced')
        AS unpriced,
    (SELECT count(*) FROM dead_letters WHERE status = 'parked' AND reason_code <> 'unpriced')
        AS dead_lettered,
    (SELECT count(*) FROM wallets) AS wallets,
    (SELECT count(*) FROM postings) AS postings
