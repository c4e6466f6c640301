-- Refunds that fail (or are canceled) after Stripe reported them give the clawback back.
--
-- Why: a refund can fail after charge.refunded (a closed card: refund.failed, or
-- charge.refund.updated to status failed); Stripe returns the money to our balance and lowers the
-- charge's cumulative amount_refunded. We booked only increases of that total, so the wallet and
-- the fee stayed clawed back, and a dispute lost later took them a second time.
--
-- The refunded amount a top-up should carry is now a function of what Stripe told us, whatever
-- the order it arrived in (billing.topups._converge_refunds):
--   target = amount_refunded of the newest charge snapshot (the largest one at that event time)
--            minus the refunds that snapshot still counted though they failed: created at or
--            before its time and failed at or after it (a refund created later is not in it).
-- refund_snapshot_at/_cents hold that newest snapshot; stripe_refund_failures the failed refunds,
-- one row per Stripe refund id. refund_postings numbers the top-up's refund postings, so their
-- references stay unique when a total is booked, reversed and booked again.
ALTER TABLE topups
    ADD COLUMN refund_snapshot_at timestamptz,
    ADD COLUMN refund_snapshot_cents bigint NOT NULL DEFAULT 0 CHECK (refund_snapshot_cents >= 0),
    ADD COLUMN refund_postings integer NOT NULL DEFAULT 0;

-- The snapshot a top-up refunded before 0010 carries is its newest charge snapshot processed:
-- the amount_refunded AND the Stripe time (event created) of the same event, the newest one (at
-- the same time the largest total, as topup_refund_snapshot keeps it). Not updated_at: that is
-- our processing time, bumped by later events, and would make a pending charge.refunded look
-- older than it is. A charge event is the top-up's by its charge id, its payment_intent or its
-- metadata.topup_id (as _on_charge finds it): a Checkout payment whose first card was declined
-- stores the declined charge's id, not the one refunded. Without such an event: the booked total
-- at updated_at.
-- One pass over stripe_events (materialized once, joined by equality on each of the three keys:
-- hash joins, no per-top-up scan while ALTER TABLE holds its lock).
WITH charge_events AS MATERIALIZED (
    SELECT e.event->'data'->'object' AS charge,
           to_timestamp((e.event->>'created')::bigint) AS at,
           (e.event->'data'->'object'->>'amount_refunded')::bigint AS cents
    FROM stripe_events e
    WHERE e.processed_at IS NOT NULL
      AND e.type IN ('charge.succeeded', 'charge.refunded', 'charge.captured')
      AND jsonb_typeof(e.event->'created') = 'number'
      AND jsonb_typeof(e.event->'data'->'object'->'amount_refunded') = 'number'
), refunded AS (
    SELECT topup_id, stripe_charge_id, stripe_payment_intent_id
    FROM topups WHERE refunded_credit + refunded_fee > 0
), matched AS (
    SELECT r.topup_id, c.at, c.cents
    FROM charge_events c JOIN refunded r ON c.charge->>'id' = r.stripe_charge_id
    UNION ALL
    SELECT r.topup_id, c.at, c.cents
    FROM charge_events c JOIN refunded r ON c.charge->>'payment_intent' = r.stripe_payment_intent_id
    UNION ALL
    SELECT r.topup_id, c.at, c.cents
    FROM charge_events c JOIN refunded r ON c.charge->'metadata'->>'topup_id' = r.topup_id
), newest AS (
    SELECT DISTINCT ON (topup_id) topup_id, at, cents
    FROM matched
    ORDER BY topup_id, at DESC, cents DESC
)
UPDATE topups t
SET refund_snapshot_cents = coalesce(n.cents, ((t.refunded_credit + t.refunded_fee) * 100)::bigint),
    refund_snapshot_at = coalesce(n.at, t.updated_at)
FROM refunded r LEFT JOIN newest n USING (topup_id)
WHERE t.topup_id = r.topup_id;

CREATE TABLE stripe_refund_failures (
    refund_id       text PRIMARY KEY,
    topup_id        text NOT NULL REFERENCES topups,
    amount          numeric(38, 12) NOT NULL CHECK (amount > 0),
    stripe_status   text NOT NULL,           -- failed or canceled
    failure_reason  text,
    refund_created  timestamptz,             -- the refund object's created (NULL: not given)
    failed_at       timestamptz NOT NULL,    -- the Stripe event's time
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_refund_failures_topup ON stripe_refund_failures (topup_id, failed_at);
