-- What recorded events were billed for, by event_id: a batch compares each resent copy of an
-- event with its recorded copy (billing.events.BILLED_CONTENT_FIELDS, in that order), and parks
-- a copy that differs as conflicting_duplicate instead of dropping it as a duplicate.
--
-- A function, like billing_claim_event_keys (migration 0007), for the same reason: it is read for
-- a few ids per batch, and it must be one primary-key probe of one monthly partition per id
-- (the key gives the row's recorded_at), whatever the statistics. A plan made on the near-empty
-- tables of a fresh database (a hash join over a scan of every partition) would otherwise be
-- kept by a worker's session while the tables grow. NULL in the 1.1 columns stands for the
-- default (0, standard, completed), as the COPY writes it.
CREATE FUNCTION billing_recorded_billed_content(p_event_ids text[])
RETURNS TABLE (
    event_id text, occurred_at timestamptz, account_id text, api_key_id text, model text,
    provider text, byok boolean, input_tokens bigint, cached_input_tokens bigint,
    cache_write_tokens bigint, output_tokens bigint, reasoning_tokens bigint, image_count bigint,
    web_search_count bigint, cache_write_1h_tokens bigint, audio_input_tokens bigint,
    audio_output_tokens bigint, service_tier text, status text, provider_usage_format text
)
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT u.event_id, u.occurred_at, u.account_id, u.api_key_id, u.model, u.provider, u.byok,
           u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
           u.reasoning_tokens, u.image_count, u.web_search_count,
           coalesce(u.cache_write_1h_tokens, 0), coalesce(u.audio_input_tokens, 0),
           coalesce(u.audio_output_tokens, 0), coalesce(u.service_tier, 'standard'),
           coalesce(u.status, 'completed'), u.provider_usage_format
    FROM usage_event_keys k
    -- LIMIT keeps the subquery apart: each key is a probe with its own values, pruned to the
    -- partition of its recorded_at while the statement runs
    CROSS JOIN LATERAL (
        SELECT * FROM usage_events e
        WHERE e.event_id = k.event_id AND e.recorded_at = k.recorded_at
        LIMIT 1
    ) u
    WHERE k.event_id = ANY(p_event_ids)
$$;
