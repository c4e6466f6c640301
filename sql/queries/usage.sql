-- name: claim_event_keys
-- The exactly-once step: claim each event's idempotency key (one key per event_id, across every
-- monthly partition of usage_events). Only keys never claimed come back. In event_id order, so
-- two workers holding the same events wait for each other's keys in the same order (no
-- deadlock); a key claimed by an uncommitted transaction is waited for, then skipped.
-- The ids come as one newline-separated text (identifiers are visible ASCII: no newline), which
-- the client sends as it is; a text[] parameter of 5,000 ids is built value by value in Python.
INSERT INTO usage_event_keys (event_id, recorded_at)
SELECT event_id, now() FROM unnest(string_to_array(%(event_ids)s, E'\n')) AS event_id
ORDER BY event_id
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id

-- name: copy_usage_events
-- The events whose key this transaction claimed (claim_event_keys), in event_id order. The insert
-- trigger (billing_claim_event_keys, migration 0006) finds their keys claimed at the same
-- recorded_at; on any other path it claims them itself.
COPY usage_events (
    event_id, occurred_at, account_id, api_key_id, model, provider, byok, price_effective_from,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    image_count, web_search_count,
    input_amount, cached_input_amount, cache_write_amount, output_amount, image_amount,
    web_search_amount, request_amount, amount, debited, posting_id, latency_ms, ttft_ms,
    cache_write_1h_tokens, audio_input_tokens, audio_output_tokens, cache_write_1h_amount,
    audio_input_amount, audio_output_amount, service_tier, status, provider_usage_format,
    provider_reported_cost
) FROM STDIN

-- name: recorded_event_ids
-- The key table: one index, whatever the number of monthly partitions of usage_events.
SELECT event_id FROM usage_event_keys WHERE event_id = ANY(%(event_ids)s)

-- name: recorded_billed_content
-- What recorded events were billed for (billing.events.BILLED_CONTENT_FIELDS, in that order),
-- for comparing a resent copy with its recorded one; one index probe per id (migration 0013).
SELECT * FROM billing_recorded_billed_content(%(event_ids)s)

-- name: provider_cost_comparison
-- Our price vs. the cost the provider reported (OpenRouter), per model and provider, for events
-- recorded in [since, until). The reported cost is recorded for comparison and never billed.
SELECT model, provider, provider_usage_format, count(*) AS events,
       sum(amount) AS our_amount, sum(provider_reported_cost) AS reported_cost,
       sum(provider_reported_cost) - sum(amount) AS difference,
       max(abs(provider_reported_cost - amount)) AS max_event_difference
FROM usage_events
WHERE provider_reported_cost IS NOT NULL
  AND recorded_at >= %(since)s AND recorded_at < %(until)s
GROUP BY model, provider, provider_usage_format
ORDER BY model, provider, provider_usage_format

-- name: events_per_account_since
-- Recorded usage per account since a time (billing broker assign: traffic per partition). The
-- (account_id, recorded_at) index and the monthly partitions' bounds keep it to the period.
SELECT account_id, count(*) AS events
FROM usage_events
WHERE recorded_at >= %(since)s
GROUP BY account_id
