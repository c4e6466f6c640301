-- name: baseline_insert_event
-- The per-event baseline (workers/baseline.py): one row, one statement, one transaction. The
-- idempotency key is claimed first (usage_event_keys); a known event_id inserts nothing.
WITH v (event_id, occurred_at, account_id, api_key_id, model, provider, byok,
        price_effective_from, input_tokens, cached_input_tokens, cache_write_tokens,
        output_tokens, reasoning_tokens, image_count, web_search_count, input_amount,
        cached_input_amount, cache_write_amount, output_amount, image_amount, web_search_amount,
        request_amount, amount, debited, posting_id, latency_ms, ttft_ms,
        cache_write_1h_tokens, audio_input_tokens, audio_output_tokens, cache_write_1h_amount,
        audio_input_amount, audio_output_amount, service_tier, status, provider_usage_format,
        provider_reported_cost) AS (
    VALUES (%s::text, %s::timestamptz, %s::text, %s::text, %s::text, %s::text, %s::boolean,
            %s::timestamptz, %s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::bigint,
            %s::bigint, %s::bigint, %s::numeric, %s::numeric, %s::numeric, %s::numeric,
            %s::numeric, %s::numeric, %s::numeric, %s::numeric, %s::numeric, %s::bigint,
            %s::bigint, %s::bigint,
            %s::bigint, %s::bigint, %s::bigint, %s::numeric, %s::numeric, %s::numeric,
            %s::text, %s::text, %s::text, %s::numeric)
), claimed AS (
    INSERT INTO usage_event_keys (event_id, recorded_at)
    SELECT event_id, now() FROM v
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, recorded_at
)
INSERT INTO usage_events (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms,
    cache_write_1h_tokens, audio_input_tokens, audio_output_tokens, cache_write_1h_amount,
    audio_input_amount, audio_output_amount, service_tier, status, provider_usage_format,
    provider_reported_cost, recorded_at)
SELECT v.*, c.recorded_at FROM v JOIN claimed c USING (event_id)
RETURNING debited
