-- Statements, invoices and reports (issue 6). Period bounds are computed per account in its
-- time zone (NULL = UTC); every statement query repeats the same `b` (bounds) CTE and orders by
-- account_id COLLATE "C", so the fleet export can merge the streams account by account.
-- Every text sort key is COLLATE "C" (code point order): an issued invoice's figures are compared
-- line by line and its cents allocated in line order, so the order must not change with the
-- database's default collation (a restore onto another cluster, a glibc or ICU upgrade).

-- name: statement_count
SELECT count(*) FROM accounts a JOIN wallets w USING (account_id)
WHERE %(account)s::text IS NULL OR a.account_id = %(account)s

-- name: statement_accounts
-- Balances from the wallet's ledger entries: opening = before the period, closing = before its
-- end; usage_ledger = the usage debits posted in the period (what the usage lines must sum to).
WITH b AS MATERIALIZED (
    SELECT * FROM billing_period_bounds(%(year)s, %(month)s, %(end_year)s, %(end_month)s,
                                        %(account)s::text)
)
SELECT b.account_id, b.name, b.time_zone, b.period_start, b.period_end,
       coalesce((SELECT sum(e.amount) FROM ledger_entries e
                  WHERE e.ledger_account_id = b.ledger_account_id
                    AND e.created_at < b.period_start), 0) AS opening,
       coalesce((SELECT sum(e.amount) FROM ledger_entries e
                  WHERE e.ledger_account_id = b.ledger_account_id
                    AND e.created_at < b.period_end), 0) AS closing,
       coalesce((SELECT sum(e.amount) FROM ledger_entries e JOIN postings p USING (posting_id)
                  WHERE e.ledger_account_id = b.ledger_account_id
                    AND e.created_at >= b.period_start AND e.created_at < b.period_end
                    AND p.kind = 'usage'), 0) AS usage_ledger,
       -- granted credit (issue 9): what the account's grants had left at the period's end, and
       -- how much of the period's usage they paid (by the time of each posting)
       coalesce((SELECT sum(c.amount) FROM credit_grants c
                  JOIN postings p ON p.posting_id = c.grant_posting_id
                  WHERE c.account_id = b.account_id AND p.created_at < b.period_end), 0)
     - coalesce((SELECT sum(c.expired) FROM credit_grants c
                  JOIN postings p ON p.posting_id = c.expiry_posting_id
                  WHERE c.account_id = b.account_id AND p.created_at < b.period_end), 0)
     - coalesce((SELECT sum(gc.amount) FROM credit_grants c
                  JOIN grant_consumptions gc USING (grant_id)
                  JOIN postings p ON p.posting_id = gc.posting_id
                  WHERE c.account_id = b.account_id AND p.created_at < b.period_end), 0)
           AS granted_closing,
       coalesce((SELECT sum(gc.amount) FROM credit_grants c
                  JOIN grant_consumptions gc USING (grant_id)
                  JOIN postings p ON p.posting_id = gc.posting_id
                  WHERE c.account_id = b.account_id AND p.created_at >= b.period_start
                    AND p.created_at < b.period_end), 0) AS usage_from_grants
FROM b
ORDER BY b.account_id COLLATE "C"

-- name: statement_movements
-- Every wallet entry of the period except usage (shown aggregated), with the platform fee the
-- same posting moved (revenue:fees: positive on a top-up, negative when a refund returns it).
WITH b AS MATERIALIZED (
    SELECT * FROM billing_period_bounds(%(year)s, %(month)s, %(end_year)s, %(end_month)s,
                                        %(account)s::text)
)
SELECT b.account_id, e.posting_id, p.kind, p.reference, p.memo, p.actor, e.created_at, e.amount,
       coalesce((SELECT sum(f.amount) FROM ledger_entries f
                   JOIN ledger_accounts fa ON fa.ledger_account_id = f.ledger_account_id
                  WHERE f.posting_id = e.posting_id AND fa.code = 'revenue:fees'), 0) AS fee
FROM b
JOIN ledger_entries e ON e.ledger_account_id = b.ledger_account_id
                     AND e.created_at >= b.period_start AND e.created_at < b.period_end
JOIN postings p ON p.posting_id = e.posting_id
WHERE p.kind <> 'usage'
ORDER BY b.account_id COLLATE "C", e.created_at, e.entry_id

-- name: statement_usage
-- Usage of the period by the time it was debited (recorded_at, the posting's time), aggregated
-- by model, provider, BYOK and price version, then one line per billable class (and service tier:
-- a non-standard tier's lines read "input_tokens [batch]") with the unit price of that version
-- and tier. `events`, `late_events` and `late_amount` are per (model, provider, BYOK, version),
-- the same on each of its lines. Events that occurred before the period are counted as late.
-- NULL in the columns of migration 0004 means 0 / standard / completed.
-- A member account's usage paid by its organisation (usage_attributions, issue 9) is on the
-- organisation's statement, attributed to the member (`member`), and not on the member's own.
WITH b AS MATERIALIZED (
    SELECT * FROM billing_period_bounds(%(year)s, %(month)s, %(end_year)s, %(end_month)s,
                                        %(account)s::text)
),
ev AS (
    SELECT b.account_id AS stmt_account, NULL::text AS member, b.period_start AS stmt_start, u.*
    FROM b
    JOIN usage_events u ON u.account_id = b.account_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
    WHERE NOT EXISTS (SELECT 1 FROM usage_attributions ua
                      WHERE ua.posting_id = u.posting_id AND ua.member_account_id = u.account_id)
    UNION ALL
    SELECT b.account_id, u.account_id, b.period_start, u.*
    FROM b
    JOIN usage_attributions ua ON ua.payer_account_id = b.account_id
    JOIN usage_events u ON u.account_id = ua.member_account_id AND u.posting_id = ua.posting_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
),
t AS (
    SELECT u.stmt_account AS account_id, u.member, u.model, u.provider, u.byok, u.price_effective_from,
           coalesce(u.service_tier, 'standard') AS service_tier,
           count(*) AS tier_events,
           count(*) FILTER (WHERE u.status IS DISTINCT FROM 'failed') AS requests,
           count(*) FILTER (WHERE u.occurred_at < u.stmt_start) AS tier_late_events,
           coalesce(sum(u.amount) FILTER (WHERE u.occurred_at < u.stmt_start), 0)
               AS tier_late_amount,
           sum(u.input_tokens) AS input_tokens, sum(u.input_amount) AS input_amount,
           sum(u.cached_input_tokens) AS cached_input_tokens,
           sum(u.cached_input_amount) AS cached_input_amount,
           sum(u.cache_write_tokens) AS cache_write_tokens,
           sum(u.cache_write_amount) AS cache_write_amount,
           coalesce(sum(u.cache_write_1h_tokens), 0) AS cache_write_1h_tokens,
           coalesce(sum(u.cache_write_1h_amount), 0) AS cache_write_1h_amount,
           sum(u.output_tokens) AS output_tokens, sum(u.output_amount) AS output_amount,
           coalesce(sum(u.audio_input_tokens), 0) AS audio_input_tokens,
           coalesce(sum(u.audio_input_amount), 0) AS audio_input_amount,
           coalesce(sum(u.audio_output_tokens), 0) AS audio_output_tokens,
           coalesce(sum(u.audio_output_amount), 0) AS audio_output_amount,
           sum(u.image_count) AS image_count, sum(u.image_amount) AS image_amount,
           sum(u.web_search_count) AS web_search_count, sum(u.web_search_amount) AS web_search_amount,
           sum(u.request_amount) AS request_amount
    FROM ev u
    GROUP BY u.stmt_account, u.member, u.model, u.provider, u.byok, u.price_effective_from,
             coalesce(u.service_tier, 'standard')
),
g AS (
    SELECT t.*,
           sum(t.tier_events) OVER w AS events,
           sum(t.tier_late_events) OVER w AS late_events,
           sum(t.tier_late_amount) OVER w AS late_amount
    FROM t
    WINDOW w AS (PARTITION BY t.account_id, t.member, t.model, t.provider, t.byok,
                              t.price_effective_from)
)
SELECT g.account_id, g.member, g.model, g.provider, g.byok, g.price_effective_from, g.events,
       g.late_events, g.late_amount,
       l.billable_class || CASE WHEN g.service_tier = 'standard' THEN ''
                                ELSE ' [' || g.service_tier || ']' END AS billable_class,
       l.quantity, l.amount, pr.unit_price, pr.per
FROM g
CROSS JOIN LATERAL (VALUES
    (1, 'input_tokens', g.input_tokens, g.input_amount),
    (2, 'cached_input_tokens', g.cached_input_tokens, g.cached_input_amount),
    (3, 'cache_write_tokens', g.cache_write_tokens, g.cache_write_amount),
    (4, 'cache_write_1h_tokens', g.cache_write_1h_tokens, g.cache_write_1h_amount),
    (5, 'output_tokens', g.output_tokens, g.output_amount),
    (6, 'audio_input_tokens', g.audio_input_tokens, g.audio_input_amount),
    (7, 'audio_output_tokens', g.audio_output_tokens, g.audio_output_amount),
    (8, 'image_count', g.image_count, g.image_amount),
    (9, 'web_search_count', g.web_search_count, g.web_search_amount),
    (10, 'request', g.requests, g.request_amount)
) AS l(ord, billable_class, quantity, amount)
LEFT JOIN prices pr ON pr.model = g.model AND pr.provider = g.provider
                   AND pr.effective_from = g.price_effective_from
                   AND pr.service_tier = g.service_tier
                   AND pr.billable_class = l.billable_class
WHERE l.amount <> 0 OR (l.ord = 10 AND pr.unit_price IS NOT NULL)
   OR (l.ord < 10 AND l.quantity > 0)
ORDER BY g.account_id COLLATE "C", g.byok, g.member COLLATE "C" NULLS FIRST, g.model COLLATE "C",
         g.provider COLLATE "C", g.price_effective_from, g.service_tier <> 'standard',
         g.service_tier COLLATE "C", l.ord

-- name: account_time_zone_for_update
-- The zone periods are cut in now. The row lock keeps a concurrent change, and an issue of a
-- statement (account_lock_share), out until this one commits.
SELECT coalesce(time_zone, 'UTC') FROM accounts WHERE account_id = %(account_id)s FOR UPDATE

-- name: last_issued_statement
-- The last period a usage statement was issued for. A statement of its own, after the lock
-- above: at READ COMMITTED it then sees an issue that committed while the lock was awaited.
SELECT max(period) FROM invoices
WHERE kind = 'usage_statement' AND account_id = %(account_id)s

-- name: account_lock_share
-- Issuing a statement holds the account's row against a change of its zone until it commits
-- (set_time_zone takes the row FOR UPDATE, then sees the invoice and refuses).
SELECT 1 FROM accounts WHERE account_id = %(account_id)s FOR SHARE

-- name: set_account_time_zone
UPDATE accounts SET time_zone = %(time_zone)s WHERE account_id = %(account_id)s
RETURNING account_id

-- name: time_zone_problem
-- NULL when the zone can cut an account's periods (migration 0014); otherwise why not.
SELECT billing_time_zone_problem(%(time_zone)s)

-- name: insert_issuer
INSERT INTO invoice_issuers (issuer, legal_name, address, prefix)
VALUES (%(issuer)s, %(legal_name)s, %(address)s, %(prefix)s)
ON CONFLICT (issuer) DO NOTHING
RETURNING issuer

-- name: lock_issuer
-- The gapless counter: held until the issuing transaction ends.
SELECT issuer, legal_name, address, prefix, last_number
FROM invoice_issuers WHERE issuer = %(issuer)s
FOR UPDATE

-- name: bump_issuer
UPDATE invoice_issuers SET last_number = %(number)s
WHERE issuer = %(issuer)s AND last_number = %(number)s - 1

-- name: find_statement_invoice
SELECT invoice_id FROM invoices
WHERE kind = 'usage_statement' AND account_id = %(account_id)s AND period = %(period)s

-- name: find_receipt_invoice
SELECT invoice_id FROM invoices WHERE kind = 'topup_receipt' AND topup_id = %(topup_id)s

-- name: insert_invoice
-- figures: the canonical JSON text of billing/exports/figures.py, stored as written (migration 0016)
INSERT INTO invoices (issuer, number, kind, account_id, period, topup_id, issued_at, issued_by,
                      format, total, content, content_sha256, figures, figures_sha256)
VALUES (%(issuer)s, %(number)s, %(kind)s, %(account_id)s, %(period)s, %(topup_id)s,
        %(issued_at)s, %(issued_by)s, %(format)s, %(total)s, %(content)s, %(content_sha256)s,
        %(figures)s::text::json, %(figures_sha256)s)
RETURNING invoice_id

-- name: invoice_by_id
-- figures as text, exactly as stored (NULL: issued before migration 0016)
SELECT i.invoice_id, i.issuer, i.number, s.prefix, i.kind, i.account_id, i.period, i.topup_id,
       i.issued_at, i.issued_by, i.format, i.total, i.content, i.content_sha256,
       i.figures::text AS figures, i.figures_sha256, s.legal_name, s.address
FROM invoices i JOIN invoice_issuers s USING (issuer)
WHERE i.invoice_id = %(invoice_id)s

-- name: invoice_by_number
SELECT i.invoice_id FROM invoices i WHERE i.issuer = %(issuer)s AND i.number = %(number)s

-- name: list_invoices
SELECT i.invoice_id, i.issuer, i.number, s.prefix, i.kind, i.account_id, i.period, i.topup_id,
       i.issued_at, i.format, i.total, i.content_sha256
FROM invoices i JOIN invoice_issuers s USING (issuer)
WHERE (%(account)s::text IS NULL OR i.account_id = %(account)s)
  AND (%(issuer)s::text IS NULL OR i.issuer = %(issuer)s)
ORDER BY i.issuer COLLATE "C", i.number
LIMIT %(limit)s

-- name: receipt_topup
-- What a top-up receipt shows (migration 0002's topups table): fixed once it succeeded.
SELECT t.topup_id, t.account_id, a.name AS account_name, t.credit, t.fee, t.charged, t.currency,
       t.status, t.succeeded_at, t.stripe_payment_intent_id
FROM topups t JOIN accounts a USING (account_id)
WHERE t.topup_id = %(topup_id)s

-- name: report_daily
-- Usage per day (in each account's time zone) and model, by the time it was debited.
WITH b AS MATERIALIZED (
    SELECT * FROM billing_period_bounds(%(year)s, %(month)s, %(end_year)s, %(end_month)s,
                                        %(account)s::text)
),
ev AS (  -- as in statement_usage: a member's usage its organisation paid is the organisation's
    SELECT b.account_id AS report_account, b.time_zone, u.*
    FROM b
    JOIN usage_events u ON u.account_id = b.account_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
    WHERE NOT EXISTS (SELECT 1 FROM usage_attributions ua
                      WHERE ua.posting_id = u.posting_id AND ua.member_account_id = u.account_id)
    UNION ALL
    SELECT b.account_id, b.time_zone, u.*
    FROM b
    JOIN usage_attributions ua ON ua.payer_account_id = b.account_id
    JOIN usage_events u ON u.account_id = ua.member_account_id AND u.posting_id = ua.posting_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
)
SELECT (u.recorded_at AT TIME ZONE u.time_zone)::date AS day, u.model, u.byok,
       count(*) AS events,
       sum(u.input_tokens + u.cached_input_tokens + u.cache_write_tokens + u.output_tokens
           + coalesce(u.cache_write_1h_tokens, 0) + coalesce(u.audio_input_tokens, 0)
           + coalesce(u.audio_output_tokens, 0)) AS tokens,
       sum(u.debited) AS spend,
       sum(u.amount) AS priced
FROM ev u
GROUP BY 1, 2, 3
ORDER BY 1, u.model COLLATE "C", 3

-- name: report_latency
-- Latency per model and provider: p50/p95 time to first token, p50 total latency, and p50
-- throughput (output tokens per second after the first token).
WITH b AS MATERIALIZED (
    SELECT * FROM billing_period_bounds(%(year)s, %(month)s, %(end_year)s, %(end_month)s,
                                        %(account)s::text)
),
ev AS (  -- as in statement_usage: a member's usage its organisation paid is the organisation's
    SELECT b.account_id AS report_account, b.time_zone, u.*
    FROM b
    JOIN usage_events u ON u.account_id = b.account_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
    WHERE NOT EXISTS (SELECT 1 FROM usage_attributions ua
                      WHERE ua.posting_id = u.posting_id AND ua.member_account_id = u.account_id)
    UNION ALL
    SELECT b.account_id, b.time_zone, u.*
    FROM b
    JOIN usage_attributions ua ON ua.payer_account_id = b.account_id
    JOIN usage_events u ON u.account_id = ua.member_account_id AND u.posting_id = ua.posting_id
                       AND u.recorded_at >= b.period_start AND u.recorded_at < b.period_end
)
SELECT u.model, u.provider, count(*) AS events,
       count(u.ttft_ms) AS with_ttft,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.ttft_ms) AS ttft_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.ttft_ms) AS ttft_p95_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.latency_ms) AS latency_p50_ms,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY u.output_tokens * 1000.0 / nullif(u.latency_ms - coalesce(u.ttft_ms, 0), 0)
       ) AS throughput_p50_tps
FROM ev u
GROUP BY u.model, u.provider
ORDER BY u.model COLLATE "C", u.provider COLLATE "C"
