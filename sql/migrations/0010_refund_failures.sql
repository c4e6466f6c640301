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

-- What was booked so far came from the largest snapshot seen: it stands as the newest, at the
-- Stripe time (event created) of the newest charge event processed for the top-up's charge, the
-- clock every later event is compared with. Not updated_at: that is our processing time, bumped
-- by later events, and would make a pending charge.refunded look older than it is. updated_at
-- only when no such event is stored.
UPDATE topups t
SET refund_snapshot_cents = ((t.refunded_credit + t.refunded_fee) * 100)::bigint,
    refund_snapshot_at = coalesce(
        (SELECT max(to_timestamp((e.event->>'created')::bigint))
         FROM stripe_events e
         WHERE e.processed_at IS NOT NULL
           AND e.type IN ('charge.succeeded', 'charge.refunded', 'charge.captured')
           AND e.event->'data'->'object'->>'id' = t.stripe_charge_id
           AND jsonb_typeof(e.event->'created') = 'number'),
        t.updated_at)
WHERE t.refunded_credit + t.refunded_fee > 0;

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
