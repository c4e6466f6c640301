-- An auto top-up keeps the payment method it was claimed with.
--
-- Why: a pending auto top-up whose intent was not recorded (a timeout) is sent again with the
-- same idempotency key; the payment method was read from the settings at send time, so a card
-- changed meanwhile made the resend differ from the first request under the same key
-- (IdempotencyConflict), which disabled auto top-up. The resend now repeats the first request.
-- NULL for manual and checkout top-ups (the caller gives the payment method to Stripe directly).
ALTER TABLE topups ADD COLUMN payment_method text;

-- A pending auto top-up was, or will be, sent with the settings' payment method of today.
UPDATE topups t SET payment_method = a.payment_method
FROM auto_topup_settings a
WHERE a.pending_topup_id = t.topup_id AND t.kind = 'auto';
