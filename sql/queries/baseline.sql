-- name: baseline_insert_event
-- The per-event baseline (workers/baseline.py): one row, one statement, one transaction.
INSERT INTO usage_events (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms,
    cache_write_1h_tokens, audio_input_tokens, audio_output_tokens, cache_write_1h_amount,
    audio_input_amount, audio_output_amount, service_tier, status, provider_usage_format,
    provider_reported_cost)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
        %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (event_id) DO NOTHING
RETURNING debited
