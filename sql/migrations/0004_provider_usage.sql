-- Provider usage adapters (issue 4): new billable classes, the service tier as a price dimension,
-- how the request ended, and what the provider itself said it cost (recorded, never billed).

-- Prices: a version may price non-standard service tiers explicitly. Existing rows are the
-- standard tier. The new classes: 1-hour cache writes, audio input and audio output tokens.
ALTER TABLE prices ADD COLUMN service_tier text NOT NULL DEFAULT 'standard'
    CHECK (service_tier IN ('standard', 'batch', 'flex', 'priority'));
ALTER TABLE prices DROP CONSTRAINT prices_pkey;
ALTER TABLE prices ADD PRIMARY KEY (model, provider, effective_from, service_tier, billable_class);
ALTER TABLE prices DROP CONSTRAINT prices_billable_class_check;
ALTER TABLE prices ADD CONSTRAINT prices_billable_class_check CHECK (billable_class IN (
    'input_tokens', 'cached_input_tokens', 'cache_write_tokens', 'output_tokens',
    'image_count', 'web_search_count', 'request',
    'cache_write_1h_tokens', 'audio_input_tokens', 'audio_output_tokens'));

-- Usage events. To keep the hot table's rows narrow, every new column is NULL in the common case
-- and NULL means its neutral value: a count or amount of 0, tier 'standard', status 'completed',
-- no provider usage object / no provider-reported cost. A NULL costs one bit of the row's null
-- bitmap instead of 8+ bytes; readers use coalesce() (exports.sql, audit.sql).
ALTER TABLE usage_events
    ADD COLUMN cache_write_1h_tokens  bigint CHECK (cache_write_1h_tokens > 0),
    ADD COLUMN audio_input_tokens     bigint CHECK (audio_input_tokens > 0),
    ADD COLUMN audio_output_tokens    bigint CHECK (audio_output_tokens > 0),
    ADD COLUMN cache_write_1h_amount  numeric(38, 12),
    ADD COLUMN audio_input_amount     numeric(38, 12),
    ADD COLUMN audio_output_amount    numeric(38, 12),
    ADD COLUMN service_tier           text CHECK (service_tier IN ('batch', 'flex', 'priority')),
    ADD COLUMN status                 text CHECK (status IN ('cancelled', 'failed')),
    -- which adapter turned the provider's usage object into the classes above (NULL: none, the
    -- gateway sent canonical usage) and, for OpenRouter, the cost OpenRouter reported: kept for
    -- comparison (`billing usage provider-costs`), never billed.
    ADD COLUMN provider_usage_format  text CHECK (provider_usage_format IN (
        'openai.chat', 'openai.responses', 'anthropic.messages', 'gemini', 'openrouter')),
    ADD COLUMN provider_reported_cost numeric(38, 12);

-- The priced total still equals the sum of the per-class amounts, new classes included. The new
-- constraint is implied by the old one for existing rows (their new amounts are NULL).
ALTER TABLE usage_events ADD CONSTRAINT usage_events_amount_classes CHECK (
    amount = input_amount + cached_input_amount + cache_write_amount + output_amount
             + image_amount + web_search_amount + request_amount
             + coalesce(cache_write_1h_amount, 0) + coalesce(audio_input_amount, 0)
             + coalesce(audio_output_amount, 0)) NOT VALID;
ALTER TABLE usage_events VALIDATE CONSTRAINT usage_events_amount_classes;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_check1;
