-- name: copy_usage_events
-- Only events the look-up (recorded_event_ids) found new, in event_id order: two workers holding
-- the same events take the key locks in the same order. A concurrent commit of one of them makes
-- this fail on usage_events_pkey, and the batch is recorded again (billing.usage.record_isolating).
COPY usage_events (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms
) FROM STDIN

-- name: recorded_event_ids
SELECT event_id FROM usage_events WHERE event_id = ANY(%(event_ids)s)
