-- The wallet step of a posting costs less per wallet it debits.
--
-- Why: a usage batch of 5,000 events debits ~650 wallets at 1,000 accounts and ~1,290 at 10,000
-- (docs/performance.md, bench.batch_steps), so the cost per wallet is what makes a fleet with more
-- accounts slower. Before, the step ran three statements over the wallets: a look-up of their
-- ledger accounts, a SELECT .. FOR UPDATE (one WAL record per wallet for the lock alone), then an
-- UPDATE that found them again. (Planned with a batch's values, as a session's first executions
-- are, each read the whole wallets table once the batch's wallets were a sizable share of it.)
--
-- 1. billing_debit_wallets: the wallets' row locks and their new balances in ONE UPDATE, which
--    visits the wallets in account_id order: a nested loop over the sorted input, each wallet
--    found by its primary key (the function's settings price hash and merge joins and sequential
--    scans out, so no other plan is cheaper; on a small table the planner would otherwise read it
--    in its physical order). Every writer of several wallets comes through here, so all lock in the
--    same global order and two workers do not deadlock (tests/integration/test_wallet_locks.py);
--    were a plan ever to differ, PostgreSQL would detect the deadlock and the batch would be
--    retried as transient, never applied twice. The state a wallet moved from is its new balance
--    minus the delta: state is a function of balance (the CHECK of 0001).
-- 2. billing_missing_wallet: the posting's entries find each wallet's ledger account in their own
--    INSERT (a join, no round trip); an account without a wallet fails it by name.
-- 3. ledger_entries_account (ledger_account_id, entry_id) is dropped: nothing reads it, and
--    ledger_entries_account_time (ledger_account_id, created_at) INCLUDE (amount), from 0003,
--    serves every look-up by ledger account. One index less to write on every entry.
-- 4. billing_check_balanced looks each posting up once, not once per entry (a usage posting has an
--    entry per wallet).

CREATE FUNCTION billing_debit_wallets(p_accounts text, p_amounts text)
RETURNS TABLE (account_id text, balance numeric, state text, old_state text)
LANGUAGE sql
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off AS $$
    -- p_accounts, p_amounts: newline-separated texts of the same length (billing.db.text_array)
    UPDATE wallets AS w
    SET balance = w.balance + d.amount,
        state = CASE WHEN w.balance + d.amount > 0 THEN 'active' ELSE 'exhausted' END,
        updated_at = now()
    FROM (SELECT u.account_id, u.amount
          FROM unnest(string_to_array(p_accounts, E'\n'),
                      string_to_array(p_amounts, E'\n')::numeric[]) AS u(account_id, amount)
          ORDER BY u.account_id) AS d
    WHERE w.account_id = d.account_id
    RETURNING w.account_id, w.balance, w.state,
              CASE WHEN w.balance - d.amount > 0 THEN 'active' ELSE 'exhausted' END
$$;

CREATE FUNCTION billing_missing_wallet(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'no wallet for account %', p_account USING ERRCODE = 'foreign_key_violation';
END $$;

DROP INDEX ledger_entries_account;

CREATE OR REPLACE FUNCTION billing_check_balanced() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
DECLARE
    bad record;
    orphan bigint;
BEGIN
    SELECT n.posting_id, sum(n.amount) <> 0 AS unbalanced INTO bad FROM new_entries n
    GROUP BY n.posting_id
    HAVING sum(n.amount) <> 0
        OR NOT EXISTS (SELECT 1 FROM postings p WHERE p.posting_id = n.posting_id)
    ORDER BY 2 DESC  -- an unbalanced posting is reported first
    LIMIT 1;
    IF FOUND AND bad.unbalanced THEN
        RAISE EXCEPTION 'posting % does not balance', bad.posting_id
            USING ERRCODE = 'check_violation';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'ledger entry names a missing posting %', bad.posting_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT n.ledger_account_id INTO orphan FROM new_entries n
    WHERE NOT EXISTS (SELECT 1 FROM ledger_accounts a
                      WHERE a.ledger_account_id = n.ledger_account_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry names a missing ledger account %', orphan
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
