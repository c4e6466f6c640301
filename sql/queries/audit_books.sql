-- Audit checks added with the fault-injection suite (issue 7); billing/audit.py runs them with
-- the checks of audit.sql. Each query's rows are violations.

-- name: audit_event_one_state
-- Every accepted event is in exactly one state: recorded (debited or BYOK, in usage_events) or
-- parked once (unpriced or another reason). A dead letter resolved as recorded must have its event
-- recorded (otherwise the event was lost), and an event is never parked twice (conflicting copies
-- under a recorded id are not the event: each distinct one has its own dead letter).
SELECT 'resolved but not recorded' AS problem, d.event_id, d.dead_letter_id, d.reason_code
FROM dead_letters d
WHERE d.status = 'resolved' AND d.event_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.event_id = d.event_id)
UNION ALL
SELECT 'parked more than once', d.event_id, min(d.dead_letter_id), min(d.reason_code)
FROM dead_letters d
WHERE d.status = 'parked' AND d.event_id IS NOT NULL AND d.reason_code <> 'conflicting_duplicate'
GROUP BY d.event_id
HAVING count(*) > 1
ORDER BY 2, 3
LIMIT 1000

-- name: audit_wallet_usage_debits
-- Per wallet: what the ledger took from it for usage equals the sum of its recorded events'
-- debits (BYOK events debit 0). A member account's events are paid by its organisation's wallet
-- (usage_attributions, per posting).
WITH ev AS (
    SELECT coalesce(ua.payer_account_id, u.account_id) AS account_id, sum(u.debited) AS debited
    FROM usage_events u
    LEFT JOIN usage_attributions ua
           ON ua.posting_id = u.posting_id AND ua.member_account_id = u.account_id
    GROUP BY 1
), en AS (
    SELECT w.account_id, -sum(e.amount) AS debited
    FROM ledger_entries e
    JOIN postings p USING (posting_id)
    JOIN wallets w USING (ledger_account_id)
    WHERE p.kind = 'usage'
    GROUP BY w.account_id
)
SELECT coalesce(ev.account_id, en.account_id) AS account_id,
       coalesce(ev.debited, 0) AS events_total, coalesce(en.debited, 0) AS ledger_total
FROM ev FULL JOIN en ON ev.account_id = en.account_id
WHERE coalesce(ev.debited, 0) <> coalesce(en.debited, 0)
ORDER BY 1

-- name: audit_trial_balance
-- Double entry as a whole: all entries of all ledger accounts sum to zero, and no entry points at
-- a missing posting.
SELECT (SELECT coalesce(sum(amount), 0) FROM ledger_entries) AS entries_total,
       (SELECT count(*) FROM ledger_entries e
         WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.posting_id = e.posting_id))
         AS orphan_entries
WHERE (SELECT coalesce(sum(amount), 0) FROM ledger_entries) <> 0
   OR EXISTS (SELECT 1 FROM ledger_entries e
              WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.posting_id = e.posting_id))

-- name: audit_stripe_money_once
-- Each Stripe payment, refund and dispute moved money at most once, so a duplicated, concurrent
-- or out-of-order webhook never double-credits: a top-up has at most one credit posting (the one
-- its record names), a refund target at most one posting, a dispute at most one hold and one
-- close; and every posting of a Stripe kind belongs to a top-up (else the other checks miss it).
SELECT 'top-up credited more than once' AS problem, tp.topup_id AS subject,
       count(*) AS postings
FROM topup_postings tp
WHERE tp.kind = 'topup'
GROUP BY tp.topup_id
HAVING count(*) > 1
UNION ALL
SELECT 'credit posting is not the one the top-up names', t.topup_id, count(*)
FROM topups t JOIN topup_postings tp ON tp.topup_id = t.topup_id AND tp.kind = 'topup'
WHERE tp.posting_id IS DISTINCT FROM t.credit_posting_id
GROUP BY t.topup_id
UNION ALL
SELECT 'refund booked more than once', p.reference, count(*)
FROM postings p
WHERE p.kind = 'topup_refund'
GROUP BY p.reference
HAVING count(*) > 1
UNION ALL
SELECT 'dispute ' || CASE WHEN p.kind = 'dispute_hold' THEN 'held' ELSE 'closed' END
       || ' more than once', p.reference, count(*)
FROM postings p
WHERE p.kind IN ('dispute_hold', 'dispute_release', 'dispute_loss')
GROUP BY p.reference, p.kind = 'dispute_hold'
HAVING count(*) > 1
UNION ALL
SELECT 'Stripe posting without a top-up', p.posting_id::text, 1
FROM postings p
WHERE p.kind IN ('topup', 'topup_refund', 'dispute_hold', 'dispute_release', 'dispute_loss')
  AND NOT EXISTS (SELECT 1 FROM topup_postings tp WHERE tp.posting_id = p.posting_id)
ORDER BY 1, 2
