-- The batch insert path before the direct COPY, kept so that `python -m bench.micro` can measure
-- the two side by side: COPY into a temporary staging table, then INSERT .. ON CONFLICT DO NOTHING.

-- name: create_usage_staging
CREATE TEMP TABLE IF NOT EXISTS usage_staging
    (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS

-- name: copy_usage_staging
COPY usage_staging (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms,
    cache_write_1h_tokens, audio_input_tokens, audio_output_tokens, cache_write_1h_amount,
    audio_input_amount, audio_output_amount, service_tier, status, provider_usage_format,
    provider_reported_cost
) FROM STDIN

-- name: insert_new_events
-- Claim each event's idempotency key (usage_event_keys) with ON CONFLICT DO NOTHING, then insert
-- only the rows whose key was claimed (a partitioned usage_events has no unique event_id).
WITH claimed AS (
    INSERT INTO usage_event_keys (event_id, recorded_at)
    SELECT event_id, now() FROM usage_staging ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
-- usage_staging is LIKE usage_events: the same columns in the same order (recorded_at from its
-- default, now(), as the key claimed above).
INSERT INTO usage_events
SELECT s.* FROM usage_staging s JOIN claimed c ON c.event_id = s.event_id
RETURNING event_id, account_id, byok, debited

-- The wallet step before migration 0009, kept so that `python -m bench.micro` can measure the two
-- side by side: the ledger accounts read first, the wallets locked, then updated.

-- name: before_0009_wallet_ledger_accounts
SELECT account_id, ledger_account_id
FROM wallets
WHERE account_id = ANY(string_to_array(%(accounts)s, E'\n'))

-- name: before_0009_insert_entries
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount)
SELECT %(posting_id)s, e.ledger_account_id, e.amount
FROM unnest(string_to_array(%(ledger_accounts)s, E'\n')::bigint[],
            string_to_array(%(amounts)s, E'\n')::numeric[]) AS e(ledger_account_id, amount)
WHERE e.amount <> 0

-- name: before_0009_update_wallet_balances
UPDATE wallets AS w
SET balance = w.balance + d.amount,
    state = CASE WHEN w.balance + d.amount > 0 THEN 'active' ELSE 'exhausted' END,
    updated_at = now()
FROM unnest(string_to_array(%(accounts)s, E'\n'),
            string_to_array(%(amounts)s, E'\n')::numeric[]) AS d(account_id, amount)
WHERE w.account_id = d.account_id
RETURNING w.account_id, w.balance, w.state

-- name: empty_wallets_in_bulk
-- %(n)s accounts named %(prefix)s00001.. with empty wallets, inserted set-wise (create_account is
-- one transaction per account): bench.micro's 10x-accounts database, tests of the wallet step.
WITH a AS (
    INSERT INTO accounts (account_id)
    SELECT %(prefix)s || lpad(g::text, 5, '0') FROM generate_series(1, %(n)s) g
    RETURNING account_id
), l AS (
    INSERT INTO ledger_accounts (code, kind) SELECT 'wallet:' || account_id, 'wallet' FROM a
    RETURNING ledger_account_id, code
)
INSERT INTO wallets (account_id, ledger_account_id)
SELECT substr(code, 8), ledger_account_id FROM l
RETURNING account_id
