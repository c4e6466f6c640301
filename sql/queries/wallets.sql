-- name: insert_account
INSERT INTO accounts (account_id, name) VALUES (%(account_id)s, %(name)s)
ON CONFLICT (account_id) DO NOTHING
RETURNING account_id

-- name: insert_ledger_account
INSERT INTO ledger_accounts (code, kind) VALUES (%(code)s, 'wallet')
RETURNING ledger_account_id

-- name: insert_wallet
INSERT INTO wallets (account_id, ledger_account_id) VALUES (%(account_id)s, %(ledger_account_id)s)

-- name: known_accounts
SELECT account_id FROM accounts WHERE account_id = ANY(%(accounts)s)

-- name: wallet_show
SELECT w.account_id, w.currency, w.balance, w.state, w.updated_at,
       (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
         WHERE e.ledger_account_id = w.ledger_account_id) AS ledger_sum,
       (SELECT count(*) FROM usage_events u WHERE u.account_id = w.account_id) AS events,
       (SELECT coalesce(sum(u.debited), 0) FROM usage_events u
         WHERE u.account_id = w.account_id) AS debited,
       (SELECT coalesce(sum(u.amount), 0) FROM usage_events u
         WHERE u.account_id = w.account_id AND u.byok) AS byok_notional
FROM wallets w
WHERE w.account_id = %(account_id)s

-- name: wallet_balances
SELECT account_id, balance, state FROM wallets ORDER BY account_id

-- name: insert_outbox
INSERT INTO outbox (routing_key, payload)
SELECT r.routing_key, r.payload
FROM unnest(%(routing_keys)s::text[], %(payloads)s::jsonb[]) AS r(routing_key, payload)

-- name: claim_outbox
-- Several relays run at once (each usage worker after its batches, the beat's task), and they
-- must publish in outbox order: a wallet's wallet.exhausted then wallet.replenished, never the
-- other way round (the gateway keeps the last state it heard). So no SKIP LOCKED: a relay waits
-- for rows another relay holds, then finds them published and goes on after them.
SELECT outbox_id, routing_key, payload
FROM outbox
WHERE published_at IS NULL
ORDER BY outbox_id
LIMIT %(limit)s
FOR UPDATE

-- name: mark_outbox_published
UPDATE outbox SET published_at = now() WHERE outbox_id = ANY(%(ids)s)
