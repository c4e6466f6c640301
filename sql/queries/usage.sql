-- name: create_usage_staging
CREATE TEMP TABLE IF NOT EXISTS usage_staging
    (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS

-- name: copy_usage_staging
COPY usage_staging (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms
) FROM STDIN

-- name: insert_new_events
-- The exactly-once step: claim each event's idempotency key (usage_event_keys, not partitioned);
-- a known event_id claims nothing, so its row is not inserted (a concurrent writer of the same
-- event waits for the other's commit, then claims nothing). Keys go in event_id order, so two
-- workers holding the same redelivered events take the key locks in the same order. The insert
-- trigger (billing_claim_event_keys) finds these keys already claimed.
WITH claimed AS (
    INSERT INTO usage_event_keys (event_id, recorded_at)
    SELECT event_id, recorded_at FROM usage_staging ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
INSERT INTO usage_events (
    event_id, occurred_at, recorded_at, account_id, api_key_id, model, provider, byok,
    price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms)
SELECT
    s.event_id, s.occurred_at, s.recorded_at, s.account_id, s.api_key_id, s.model, s.provider,
    s.byok, s.price_effective_from,
    s.input_tokens, s.cached_input_tokens, s.cache_write_tokens, s.output_tokens,
    s.reasoning_tokens, s.image_count, s.web_search_count,
    s.input_amount, s.cached_input_amount, s.cache_write_amount, s.output_amount, s.image_amount,
    s.web_search_amount, s.request_amount, s.amount, s.debited, s.posting_id, s.latency_ms,
    s.ttft_ms
FROM usage_staging s JOIN claimed c USING (event_id)
RETURNING event_id, account_id, byok, debited

-- name: recorded_event_ids
-- The key table: one index, whatever the number of monthly partitions of usage_events.
SELECT event_id FROM usage_event_keys WHERE event_id = ANY(%(event_ids)s)
