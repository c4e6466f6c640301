-- name: park
-- One parked row per dedup key: a redelivered bad message bumps attempts instead of piling up.
INSERT INTO dead_letters (dedup_key, event_id, account_id, reason_code, field, reason, payload,
                          payload_bytes)
VALUES (%(dedup_key)s, %(event_id)s, %(account_id)s, %(reason_code)s, %(field)s, %(reason)s,
        %(payload)s, %(payload_bytes)s)
ON CONFLICT (dedup_key) WHERE status = 'parked' DO UPDATE
SET attempts = dead_letters.attempts + 1,
    last_seen_at = now(),
    reason_code = excluded.reason_code,
    field = excluded.field,
    reason = excluded.reason,
    payload = excluded.payload,
    payload_bytes = excluded.payload_bytes

-- name: any_parked
-- Cheap guard: resolving by a batch's event ids is skipped while nothing is parked.
SELECT EXISTS (SELECT 1 FROM dead_letters WHERE status = 'parked')

-- name: resolve_recorded
-- Parked rows whose event is now recorded (by a replay, or by a redelivery after a fix).
UPDATE dead_letters
SET status = 'resolved', resolved_at = now(), resolution = %(resolution)s
WHERE status = 'parked' AND dedup_key = ANY(%(event_ids)s)

-- name: list_dead_letters
SELECT dead_letter_id, status, reason_code, field, reason, event_id, account_id, attempts,
       payload_bytes, first_seen_at, last_seen_at, resolution
FROM dead_letters
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(reason_code)s::text IS NULL OR reason_code = %(reason_code)s)
ORDER BY dead_letter_id
LIMIT %(limit)s

-- name: claim_parked
SELECT dead_letter_id, dedup_key, event_id, payload
FROM dead_letters
WHERE status = 'parked'
  AND (%(ids)s::bigint[] IS NULL OR dead_letter_id = ANY(%(ids)s))
  AND (%(reason_code)s::text IS NULL OR reason_code = %(reason_code)s)
  AND dead_letter_id > %(after)s
ORDER BY dead_letter_id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- name: discard
UPDATE dead_letters
SET status = 'discarded', resolved_at = now(), resolution = %(resolution)s
WHERE status = 'parked' AND dead_letter_id = ANY(%(ids)s)
RETURNING dead_letter_id

-- name: dead_letter_counts
SELECT status, reason_code, count(*) FROM dead_letters GROUP BY status, reason_code
ORDER BY status, reason_code
