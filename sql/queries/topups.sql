-- name: stripe_customer_get
SELECT stripe_customer_id FROM stripe_customers WHERE account_id = %(account_id)s

-- name: stripe_customer_insert
INSERT INTO stripe_customers (account_id, stripe_customer_id)
VALUES (%(account_id)s, %(stripe_customer_id)s)
ON CONFLICT (account_id) DO NOTHING

-- name: stripe_customer_ids
SELECT account_id, stripe_customer_id FROM stripe_customers

-- name: topup_insert
INSERT INTO topups (topup_id, account_id, kind, credit, fee, charged, payment_method)
VALUES (%(topup_id)s, %(account_id)s, %(kind)s, %(credit)s, %(fee)s, %(charged)s,
        %(payment_method)s)
ON CONFLICT (topup_id) DO NOTHING

-- name: topup_get
SELECT * FROM topups WHERE topup_id = %(topup_id)s

-- name: topup_lock
SELECT * FROM topups WHERE topup_id = %(topup_id)s FOR UPDATE

-- name: topup_lock_skip_locked
SELECT * FROM topups WHERE topup_id = %(topup_id)s FOR UPDATE SKIP LOCKED

-- name: topup_lock_by_stripe
-- The top-up a Stripe object belongs to, by any id we know of it (first match wins).
SELECT * FROM topups
WHERE topup_id = %(topup_id)s
   OR stripe_payment_intent_id = %(payment_intent_id)s
   OR stripe_charge_id = %(charge_id)s
   OR stripe_checkout_session_id = %(checkout_session_id)s
ORDER BY (topup_id = %(topup_id)s) DESC NULLS LAST
LIMIT 1
FOR UPDATE

-- name: topup_set_stripe_ids
UPDATE topups
SET stripe_payment_intent_id = coalesce(stripe_payment_intent_id, %(payment_intent_id)s),
    stripe_checkout_session_id = coalesce(stripe_checkout_session_id, %(checkout_session_id)s),
    stripe_charge_id = coalesce(stripe_charge_id, %(charge_id)s),
    updated_at = now()
WHERE topup_id = %(topup_id)s

-- name: topup_mark_succeeded
UPDATE topups
SET status = 'succeeded', succeeded_at = now(), credit_posting_id = %(posting_id)s,
    failure_reason = NULL, updated_at = now()
WHERE topup_id = %(topup_id)s AND status <> 'succeeded'

-- name: topup_mark_unpaid
-- failed or canceled; never overrides a success (Stripe's succeeded is final)
UPDATE topups
SET status = %(status)s, failure_reason = %(reason)s, updated_at = now()
WHERE topup_id = %(topup_id)s AND status = 'pending'
RETURNING topup_id

-- name: topup_add_refund
-- credit and fee are signed: a failed refund gives back what its refund took.
UPDATE topups
SET refunded_credit = refunded_credit + %(credit)s, refunded_fee = refunded_fee + %(fee)s,
    refund_postings = %(refund_postings)s, updated_at = now()
WHERE topup_id = %(topup_id)s

-- name: topup_refund_snapshot
-- Keep the newest charge snapshot (event time); at the same time the largest total wins
-- (amount_refunded grows within a second; a failure is accounted apart, by its own time).
UPDATE topups
SET refund_snapshot_cents = CASE
        WHEN refund_snapshot_at IS NULL OR %(at)s > refund_snapshot_at THEN %(cents)s
        WHEN %(at)s = refund_snapshot_at THEN greatest(refund_snapshot_cents, %(cents)s)
        ELSE refund_snapshot_cents END,
    refund_snapshot_at = greatest(coalesce(refund_snapshot_at, %(at)s), %(at)s)
WHERE topup_id = %(topup_id)s
RETURNING refund_snapshot_at, refund_snapshot_cents

-- name: refund_failure_insert
-- Several events report one failure (refund.failed, refund.updated, charge.refund.updated), in
-- any order: the earliest failure time is kept, so the result does not depend on which is first.
-- Returns the row when it is new or moved earlier.
INSERT INTO stripe_refund_failures (refund_id, topup_id, amount, stripe_status, failure_reason,
                                    refund_created, failed_at)
VALUES (%(refund_id)s, %(topup_id)s, %(amount)s, %(stripe_status)s, %(failure_reason)s,
        %(refund_created)s, %(at)s)
ON CONFLICT (refund_id) DO UPDATE
SET failed_at = least(stripe_refund_failures.failed_at, excluded.failed_at),
    refund_created = coalesce(stripe_refund_failures.refund_created, excluded.refund_created)
WHERE excluded.failed_at < stripe_refund_failures.failed_at
   OR (stripe_refund_failures.refund_created IS NULL AND excluded.refund_created IS NOT NULL)
RETURNING refund_id

-- name: refund_failures_not_in_snapshot
-- Failed refunds the snapshot taken at %(at)s still counts: created at or before it (a refund
-- created later is not in its amount_refunded) and failed at or after it. In the same second
-- both are taken as counted: a refund's own charge.refunded carries its creation second, and
-- the largest snapshot of a second is kept, the one before a failure in that second.
SELECT coalesce(sum(amount), 0) FROM stripe_refund_failures
WHERE topup_id = %(topup_id)s
  AND (%(at)s::timestamptz IS NULL
       OR (failed_at >= %(at)s AND (refund_created IS NULL OR refund_created <= %(at)s)))

-- name: topup_posting_insert
INSERT INTO topup_postings (posting_id, topup_id, kind)
VALUES (%(posting_id)s, %(topup_id)s, %(kind)s)

-- name: topups_list
SELECT * FROM topups
WHERE (%(account_id)s::text IS NULL OR account_id = %(account_id)s)
ORDER BY created_at DESC, topup_id
LIMIT %(limit)s

-- name: topups_since
SELECT * FROM topups WHERE created_at >= %(since)s ORDER BY created_at, topup_id

-- name: dispute_lock
SELECT * FROM stripe_disputes WHERE dispute_id = %(dispute_id)s FOR UPDATE

-- name: dispute_insert
INSERT INTO stripe_disputes (dispute_id, topup_id, account_id, amount, held_credit, fee_part,
                             status, stripe_status, hold_posting_id)
VALUES (%(dispute_id)s, %(topup_id)s, %(account_id)s, %(amount)s, %(held_credit)s, %(fee_part)s,
        'held', %(stripe_status)s, %(posting_id)s)

-- name: dispute_close
UPDATE stripe_disputes
SET status = %(status)s, stripe_status = %(stripe_status)s, close_posting_id = %(posting_id)s,
    closed_at = now()
WHERE dispute_id = %(dispute_id)s AND status = 'held'

-- name: dispute_touch
UPDATE stripe_disputes SET stripe_status = %(stripe_status)s WHERE dispute_id = %(dispute_id)s

-- name: disputes_for_topups
SELECT topup_id, dispute_id, status FROM stripe_disputes WHERE topup_id = ANY(%(topup_ids)s)

-- name: wallet_freeze
UPDATE wallets SET frozen = true, updated_at = now()
WHERE account_id = %(account_id)s AND NOT frozen
RETURNING account_id, balance

-- name: wallet_unfreeze
-- only when no other dispute of the account is still open
UPDATE wallets SET frozen = false, updated_at = now()
WHERE account_id = %(account_id)s AND frozen
  AND NOT EXISTS (SELECT 1 FROM stripe_disputes d
                  WHERE d.account_id = %(account_id)s AND d.status = 'held')
RETURNING account_id, balance

-- name: stripe_event_store
-- A redelivery of a stored event only counts the delivery.
INSERT INTO stripe_events (event_id, type, api_version, livemode, payload, event)
VALUES (%(event_id)s, %(type)s, %(api_version)s, %(livemode)s, %(payload)s, %(event)s)
ON CONFLICT (event_id) DO UPDATE SET deliveries = stripe_events.deliveries + 1
RETURNING processed_at, deliveries

-- name: stripe_event_attempt
UPDATE stripe_events SET attempts = attempts + 1 WHERE event_id = %(event_id)s
RETURNING attempts

-- name: stripe_event_lock
SELECT event_id, type, event, processed_at, received_at FROM stripe_events
WHERE event_id = %(event_id)s
FOR UPDATE

-- name: stripe_event_done
UPDATE stripe_events SET processed_at = now(), outcome = %(outcome)s, last_error = NULL
WHERE event_id = %(event_id)s

-- name: stripe_event_waiting
-- Still waiting; given up (abandoned) once the window has passed since receipt or last replay.
UPDATE stripe_events
SET outcome = %(outcome)s,
    abandoned_at = CASE WHEN coalesce(replayed_at, received_at) < now() - %(give_up)s::interval
                        THEN coalesce(abandoned_at, now()) END
WHERE event_id = %(event_id)s
RETURNING abandoned_at

-- name: stripe_event_error
UPDATE stripe_events SET last_error = %(error)s WHERE event_id = %(event_id)s

-- name: stripe_events_pending
-- The least-tried first: events that keep waiting or failing go behind fresh ones.
SELECT event_id FROM stripe_events
WHERE processed_at IS NULL AND abandoned_at IS NULL
ORDER BY attempts, received_at, event_id
LIMIT %(limit)s

-- name: stripe_events_list
-- state: pending (to process), abandoned (gave up waiting), ignored (not ours or not handled),
-- processed (everything done, ignored included); NULL: all.
SELECT event_id, type, received_at, deliveries, attempts, processed_at, abandoned_at,
       replayed_at, outcome, last_error
FROM stripe_events
WHERE (%(state)s::text IS NULL
       OR (%(state)s = 'pending' AND processed_at IS NULL AND abandoned_at IS NULL)
       OR (%(state)s = 'abandoned' AND processed_at IS NULL AND abandoned_at IS NOT NULL)
       OR (%(state)s = 'ignored' AND processed_at IS NOT NULL
           AND starts_with(outcome, 'ignored:'))
       OR (%(state)s = 'processed' AND processed_at IS NOT NULL))
  AND (%(type)s::text IS NULL OR type = %(type)s)
ORDER BY received_at DESC, event_id
LIMIT %(limit)s

-- name: stripe_event_replay
-- An operator replays an abandoned or ignored event: processed again, with a fresh window.
UPDATE stripe_events
SET abandoned_at = NULL, processed_at = NULL, replayed_at = now()
WHERE event_id = %(event_id)s
  AND ((processed_at IS NULL AND abandoned_at IS NOT NULL)
       OR (processed_at IS NOT NULL AND starts_with(outcome, 'ignored:')))
RETURNING event_id

-- name: stripe_event_get
SELECT event_id, type, received_at, deliveries, attempts, processed_at, outcome, last_error
FROM stripe_events WHERE event_id = %(event_id)s

-- name: auto_topup_upsert
INSERT INTO auto_topup_settings (account_id, enabled, threshold, amount, payment_method)
VALUES (%(account_id)s, true, %(threshold)s, %(amount)s, %(payment_method)s)
ON CONFLICT (account_id) DO UPDATE
SET enabled = true, threshold = excluded.threshold, amount = excluded.amount,
    payment_method = excluded.payment_method, disabled_reason = NULL, updated_at = now()

-- name: auto_topup_pending_get
SELECT pending_topup_id FROM auto_topup_settings WHERE account_id = %(account_id)s

-- name: auto_topup_disable
-- A pending top-up is kept (it may have reached Stripe): resumed with its key on re-enable.
UPDATE auto_topup_settings
SET enabled = false, disabled_reason = %(reason)s, updated_at = now()
WHERE account_id = %(account_id)s
RETURNING account_id, pending_topup_id

-- name: auto_topup_get
SELECT * FROM auto_topup_settings WHERE account_id = %(account_id)s

-- name: auto_topup_candidates
-- Accounts that need an auto top-up now (re-checked under the row lock by auto_topup_claim),
-- and those whose pending top-up was recorded but has no intent yet (a transient failure: sent
-- again with the same key whatever the balance is now).
-- A wallet frozen by a dispute is never topped up: its balance is low because the disputed
-- credit is held, and the card holder who disputes must not be charged off-session again.
SELECT a.account_id
FROM auto_topup_settings a JOIN wallets w USING (account_id)
WHERE a.enabled AND NOT w.frozen
  AND ((a.pending_topup_id IS NULL AND w.balance < a.threshold)
       OR (a.pending_topup_id IS NOT NULL AND a.pending_intent_id IS NULL))
ORDER BY a.account_id
LIMIT %(limit)s

-- name: auto_topup_claim
-- SKIP LOCKED: a concurrent checker that holds this row is already creating the intent.
SELECT a.account_id, a.threshold, a.amount, a.payment_method, a.attempts, w.balance
FROM auto_topup_settings a JOIN wallets w USING (account_id)
WHERE a.account_id = %(account_id)s
  AND a.enabled AND a.pending_topup_id IS NULL AND w.balance < a.threshold AND NOT w.frozen
FOR UPDATE OF a SKIP LOCKED

-- name: auto_topup_set_pending
-- Committed before Stripe is called; the intent is recorded by auto_topup_set_intent.
UPDATE auto_topup_settings
SET pending_topup_id = %(topup_id)s, pending_intent_id = NULL,
    attempts = %(attempts)s, updated_at = now()
WHERE account_id = %(account_id)s

-- name: auto_topup_unsent
-- The account's pending auto top-up that has no intent yet, if Stripe may be asked for it now.
SELECT a.pending_topup_id
FROM auto_topup_settings a JOIN wallets w USING (account_id)
WHERE a.account_id = %(account_id)s AND a.enabled AND NOT w.frozen
  AND a.pending_topup_id IS NOT NULL AND a.pending_intent_id IS NULL

-- name: auto_topup_lock_unsent
-- Taken after the top-up's row lock (the order a webhook locks them in), re-checked.
SELECT a.payment_method
FROM auto_topup_settings a JOIN wallets w USING (account_id)
WHERE a.account_id = %(account_id)s AND a.pending_topup_id = %(topup_id)s
  AND a.pending_intent_id IS NULL AND a.enabled AND NOT w.frozen
FOR UPDATE OF a

-- name: auto_topup_set_intent
UPDATE auto_topup_settings
SET pending_intent_id = %(intent_id)s, updated_at = now()
WHERE account_id = %(account_id)s AND pending_topup_id = %(topup_id)s

-- name: auto_topup_declined
-- A permanent refusal: disabled with the reason (attempts kept when not given). The pending
-- top-up is cleared only if it is the refused one (%(topup_id)s); any other may have reached
-- Stripe and stays pending.
UPDATE auto_topup_settings
SET enabled = false, disabled_reason = %(reason)s,
    pending_intent_id = CASE WHEN pending_topup_id = %(topup_id)s::text
                             THEN NULL ELSE pending_intent_id END,
    pending_topup_id = CASE WHEN pending_topup_id = %(topup_id)s::text
                            THEN NULL ELSE pending_topup_id END,
    attempts = coalesce(%(attempts)s::integer, attempts),
    updated_at = now()
WHERE account_id = %(account_id)s

-- name: auto_topup_settle
-- The pending intent of this top-up resolved; clear it (and disable on failure).
UPDATE auto_topup_settings
SET pending_topup_id = NULL, pending_intent_id = NULL,
    enabled = enabled AND %(succeeded)s,
    disabled_reason = CASE WHEN %(succeeded)s THEN disabled_reason ELSE %(reason)s END,
    updated_at = now()
WHERE pending_topup_id = %(topup_id)s
RETURNING account_id
