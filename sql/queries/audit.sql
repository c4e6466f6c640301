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
-- A member account's events are paid by its organisation's wallet (usage_attributions).
WITH ev AS (
    SELECT u.posting_id, coalesce(ua.payer_account_id, u.account_id) AS account_id,
           sum(u.debited) AS debited
    FROM usage_events u
    LEFT JOIN usage_attributions ua
           ON ua.posting_id = u.posting_id AND ua.member_account_id = u.account_id
    WHERE u.posting_id IS NOT NULL
    GROUP BY 1, 2
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
-- An event is in exactly one state: recorded (debited or BYOK) or parked, never both. A parked
-- conflicting_duplicate is not the event but another content sent under its recorded id: its
-- event must be recorded (the copy that stands).
SELECT d.dead_letter_id, d.event_id, d.reason_code
FROM dead_letters d
WHERE d.status = 'parked' AND d.event_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM usage_events u WHERE u.event_id = d.event_id)
      <> (d.reason_code = 'conflicting_duplicate')
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

-- name: audit_topup_ledger
-- Per top-up, what its postings moved equals its record: the wallet got credit - refunded_credit,
-- revenue:fees got fee - refunded_fee, and clearing:stripe gave what was charged net of refunds.
WITH moved AS (
    SELECT tp.topup_id,
           coalesce(sum(e.amount) FILTER (WHERE la.kind = 'wallet'), 0) AS wallet,
           coalesce(sum(e.amount) FILTER (WHERE la.code = 'revenue:fees'), 0) AS fees,
           coalesce(sum(e.amount) FILTER (WHERE la.code = 'clearing:stripe'), 0) AS clearing
    FROM topup_postings tp
    JOIN ledger_entries e USING (posting_id)
    JOIN ledger_accounts la USING (ledger_account_id)
    WHERE tp.kind IN ('topup', 'topup_refund')
    GROUP BY tp.topup_id
)
SELECT t.topup_id, t.status, t.credit, t.fee, t.refunded_credit, t.refunded_fee,
       coalesce(m.wallet, 0) AS wallet_moved, coalesce(m.fees, 0) AS fees_moved,
       coalesce(m.clearing, 0) AS clearing_moved
FROM topups t LEFT JOIN moved m USING (topup_id)
WHERE coalesce(m.wallet, 0)
        <> CASE WHEN t.status = 'succeeded' THEN t.credit - t.refunded_credit ELSE 0 END
   OR coalesce(m.fees, 0)
        <> CASE WHEN t.status = 'succeeded' THEN t.fee - t.refunded_fee ELSE 0 END
   OR coalesce(m.clearing, 0) <> CASE WHEN t.status = 'succeeded'
        THEN -(t.charged - t.refunded_credit - t.refunded_fee) ELSE 0 END
ORDER BY t.topup_id

-- name: audit_dispute_holds
-- liability:dispute_holds holds exactly the credit of the disputes still open, and each dispute's
-- postings moved what its record says (held, then released to the wallet or lost to Stripe).
WITH per_dispute AS (
    SELECT d.dispute_id, d.status, d.held_credit,
           coalesce(sum(e.amount) FILTER (WHERE la.code = 'liability:dispute_holds'), 0) AS held,
           coalesce(sum(e.amount) FILTER (WHERE la.kind = 'wallet'), 0) AS wallet
    FROM stripe_disputes d
    LEFT JOIN ledger_entries e ON e.posting_id IN (d.hold_posting_id, d.close_posting_id)
    LEFT JOIN ledger_accounts la USING (ledger_account_id)
    GROUP BY d.dispute_id, d.status, d.held_credit
)
SELECT dispute_id, status, held_credit, held, wallet FROM per_dispute
WHERE held <> CASE WHEN status = 'held' THEN held_credit ELSE 0 END
   OR wallet <> CASE status WHEN 'held' THEN -held_credit WHEN 'won' THEN 0
                            ELSE -held_credit END
UNION ALL
SELECT 'liability:dispute_holds', 'total',
       (SELECT coalesce(sum(held_credit), 0) FROM stripe_disputes WHERE status = 'held'),
       (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
          JOIN ledger_accounts la USING (ledger_account_id)
         WHERE la.code = 'liability:dispute_holds'),
       0
WHERE (SELECT coalesce(sum(held_credit), 0) FROM stripe_disputes WHERE status = 'held')
   <> (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
         JOIN ledger_accounts la USING (ledger_account_id)
        WHERE la.code = 'liability:dispute_holds')

-- name: audit_topup_totals
-- Platform accounts equal the top-up records: fee revenue is the fees kept (net of refunds and
-- lost disputes); Stripe clearing is everything charged net of refunds and lost disputes.
WITH expected AS (
    SELECT
        (SELECT coalesce(sum(fee - refunded_fee), 0) FROM topups WHERE status = 'succeeded')
          - (SELECT coalesce(sum(fee_part), 0) FROM stripe_disputes WHERE status = 'lost')
          AS fees,
        -(SELECT coalesce(sum(charged - refunded_credit - refunded_fee), 0) FROM topups
           WHERE status = 'succeeded')
          + (SELECT coalesce(sum(amount), 0) FROM stripe_disputes WHERE status = 'lost')
          AS clearing
), actual AS (
    SELECT coalesce(sum(e.amount) FILTER (WHERE la.code = 'revenue:fees'), 0) AS fees,
           coalesce(sum(e.amount) FILTER (WHERE la.code = 'clearing:stripe'), 0) AS clearing
    FROM ledger_entries e JOIN ledger_accounts la USING (ledger_account_id)
    WHERE la.code IN ('revenue:fees', 'clearing:stripe')
)
SELECT x.fees AS expected_fees, a.fees AS ledger_fees,
       x.clearing AS expected_clearing, a.clearing AS ledger_clearing
FROM expected x, actual a
WHERE x.fees <> a.fees OR x.clearing <> a.clearing

-- name: audit_frozen_wallets
-- A wallet is frozen exactly while one of its disputes is open.
SELECT w.account_id, w.frozen
FROM wallets w
WHERE w.frozen <> EXISTS (SELECT 1 FROM stripe_disputes d
                          WHERE d.account_id = w.account_id AND d.status = 'held')
ORDER BY w.account_id

-- name: audit_event_recorded_at
-- Statements assign usage to a period by recorded_at; it must be the time of the posting that
-- debited the event, so the usage lines reconcile with the ledger (billing/exports).
SELECT u.event_id, u.recorded_at, p.created_at AS posted_at
FROM usage_events u JOIN postings p ON p.posting_id = u.posting_id
WHERE u.recorded_at <> p.created_at
ORDER BY u.event_id
LIMIT 1000

-- name: audit_invoice_hashes
-- The stored bytes and, since migration 0016, the stored figures, each against its SHA-256.
SELECT invoice_id, issuer, number
FROM invoices
WHERE content_sha256 <> encode(sha256(content), 'hex')
   OR (figures IS NULL) <> (figures_sha256 IS NULL)
   OR figures_sha256 <> encode(sha256(convert_to(figures::text, 'UTF8')), 'hex')
ORDER BY invoice_id

-- name: audit_invoice_numbers
-- Per issuer: numbers are exactly 1..last_number (no gap, no number beyond the counter).
SELECT s.issuer, s.last_number, count(i.invoice_id) AS invoices, max(i.number) AS max_number
FROM invoice_issuers s LEFT JOIN invoices i USING (issuer)
GROUP BY s.issuer, s.last_number
HAVING count(i.invoice_id) <> s.last_number OR coalesce(max(i.number), 0) <> s.last_number
ORDER BY s.issuer

-- name: audit_event_tier_prices
-- Every event priced in a non-standard service tier has that tier's prices in its price version
-- (migration 0004: NULL service_tier = standard).
SELECT u.event_id, u.model, u.provider, u.price_effective_from, u.service_tier
FROM usage_events u
WHERE u.service_tier IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM prices p
                  WHERE p.model = u.model AND p.provider = u.provider
                    AND p.effective_from = u.price_effective_from
                    AND p.service_tier = u.service_tier)
ORDER BY u.event_id
LIMIT 1000

-- name: audit_event_new_classes
-- The classes of migration 0004 carry an amount exactly when they carry a count, and a
-- provider-reported cost only comes with the provider usage object that reported it.
SELECT u.event_id
FROM usage_events u
WHERE (u.cache_write_1h_tokens IS NULL) <> (u.cache_write_1h_amount IS NULL)
   OR (u.audio_input_tokens IS NULL) <> (u.audio_input_amount IS NULL)
   OR (u.audio_output_tokens IS NULL) <> (u.audio_output_amount IS NULL)
   OR (u.provider_reported_cost IS NOT NULL AND u.provider_usage_format IS NULL)
ORDER BY u.event_id
LIMIT 1000
