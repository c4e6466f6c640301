-- Stripe events that wait for a top-up no one will ever record give up, and cannot starve ours.
--
-- Why: charges and disputes of other products on the same Stripe account stayed "waiting"
-- forever, and the pending scan took the oldest 1,000 unprocessed events, so 1,000 of them
-- filled every slot and our own events were never retried.
--
-- abandoned_at: a waiting event given up (no top-up known for it after the window, counted from
-- received_at or from the operator's last replay, replayed_at); listed by `billing stripe events
-- --state abandoned`, replayed by `billing stripe replay`. The pending scan skips it and takes the
-- least-tried events first, so fresh events are never behind retried ones.
ALTER TABLE stripe_events
    ADD COLUMN abandoned_at timestamptz,
    ADD COLUMN replayed_at timestamptz;

DROP INDEX stripe_events_pending;
CREATE INDEX stripe_events_pending ON stripe_events (attempts, received_at)
    WHERE processed_at IS NULL AND abandoned_at IS NULL;
