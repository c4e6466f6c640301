-- name: ensure_usage_partitions
-- Create the monthly usage_events partitions from %(from)s's month to %(ahead)s months ahead.
SELECT billing_ensure_usage_partitions(%(from)s, %(ahead)s) AS created

-- name: usage_partitions
-- Every partition of usage_events with its bounds and an estimate of its rows.
SELECT c.relname AS name,
       pg_get_expr(c.relpartbound, c.oid) AS bounds,
       greatest(c.reltuples, 0)::bigint AS rows_estimate,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_events'::regclass
ORDER BY c.relname

-- name: purge_dead_letter_payloads
-- Retention: remove the payload of dead letters resolved or discarded before %(before)s.
UPDATE dead_letters SET payload = NULL, payload_purged_at = now()
WHERE status <> 'parked' AND payload IS NOT NULL AND coalesce(resolved_at, last_seen_at) < %(before)s

-- name: purge_stripe_event_payloads
-- Retention: remove the raw bytes of Stripe events processed before %(before)s (the parsed
-- event, its id, type and outcome stay).
UPDATE stripe_events SET payload = NULL, payload_purged_at = now()
WHERE processed_at IS NOT NULL AND payload IS NOT NULL AND processed_at < %(before)s

-- name: audit_event_keys
-- Exactly once across partitions: every recorded event holds its idempotency key at the same
-- recorded_at, and every key has its event (so no event_id is recorded twice in any partitions).
SELECT coalesce(u.event_id, k.event_id) AS event_id, u.recorded_at AS event_recorded_at,
       k.recorded_at AS key_recorded_at
FROM usage_event_keys k
FULL JOIN usage_events u ON u.event_id = k.event_id AND u.recorded_at = k.recorded_at
WHERE u.event_id IS NULL OR k.event_id IS NULL
ORDER BY 1
LIMIT 1000

-- name: audit_partitions_ahead
-- usage_events has a partition for this month and next month (else inserts would be refused).
SELECT billing_usage_partition_name(m::date) AS missing_partition
FROM generate_series(date_trunc('month', now() AT TIME ZONE 'UTC'),
                     date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month',
                     interval '1 month') AS m
WHERE to_regclass(quote_ident(billing_usage_partition_name(m::date))) IS NULL
