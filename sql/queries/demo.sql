-- name: demo_processed
-- Items of a run that reached a final state (recorded or parked) since it started.
SELECT (SELECT count(*) FROM usage_events WHERE recorded_at >= %(t)s)
     + (SELECT count(*) FROM dead_letters WHERE first_seen_at >= %(t)s)

-- name: demo_totals
SELECT count(*), count(*) FILTER (WHERE byok), coalesce(sum(debited), 0),
       coalesce(sum(amount) FILTER (WHERE byok), 0), min(recorded_at), max(recorded_at)
FROM usage_events WHERE recorded_at >= %(t)s

-- name: demo_parked
SELECT reason_code, count(*) FROM dead_letters WHERE first_seen_at >= %(t)s
GROUP BY 1 ORDER BY 1

-- name: demo_by_model
SELECT model, provider, count(*), sum(amount)
FROM usage_events WHERE recorded_at >= %(t)s AND NOT byok
GROUP BY 1, 2 ORDER BY 4 DESC

-- name: demo_by_class
SELECT sum(input_tokens), sum(input_amount), sum(cached_input_tokens), sum(cached_input_amount),
       sum(cache_write_tokens), sum(cache_write_amount), sum(output_tokens), sum(output_amount),
       sum(image_count), sum(image_amount), sum(web_search_count), sum(web_search_amount),
       count(*), sum(request_amount),
       sum(cache_write_1h_tokens), sum(cache_write_1h_amount),
       sum(audio_input_tokens), sum(audio_input_amount),
       sum(audio_output_tokens), sum(audio_output_amount)
FROM usage_events WHERE recorded_at >= %(t)s AND NOT byok

-- name: demo_busiest_wallets
SELECT w.account_id, w.balance, w.state, count(u.event_id)
FROM wallets w JOIN usage_events u ON u.account_id = w.account_id AND u.recorded_at >= %(t)s
GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 10
