-- Ledger entries: their posting and ledger account are checked once per INSERT statement, by the
-- trigger that already checks the posting balances, instead of by two foreign keys per row.
--
-- Why: a usage batch writes one entry per wallet it debits (hundreds), while holding those
-- wallets' row locks. Each foreign key ran a per-row look-up that also share-locked the referenced
-- row, and every batch of every worker share-locked the same rows (its posting, the usage revenue
-- account), which PostgreSQL records as multixacts. Checked per statement, the entries of one
-- batch of 666 wallets take about half the time (bench.micro, docs/performance.md).
--
-- Same guarantee: an entry cannot name a posting or a ledger account that does not exist
-- (foreign_key_violation from the trigger, for the whole statement), and neither can disappear
-- afterwards: postings are append-only (0001), ledger accounts are never deleted (below), which is
-- what the foreign keys' lock protected against.
ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_posting_id_fkey,
    DROP CONSTRAINT ledger_entries_ledger_account_id_fkey;

CREATE TRIGGER ledger_accounts_no_delete BEFORE DELETE ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION billing_forbid_change();
CREATE TRIGGER ledger_accounts_no_truncate BEFORE TRUNCATE ON ledger_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION billing_forbid_change();

-- Planned with seq scans off, as the key probe of 0007: index look-ups whatever the statistics
-- said when a session first planned it.
CREATE OR REPLACE FUNCTION billing_check_balanced() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
DECLARE
    unbalanced bigint;
    orphan record;
BEGIN
    SELECT posting_id INTO unbalanced FROM new_entries
        GROUP BY posting_id HAVING sum(amount) <> 0 LIMIT 1;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'posting % does not balance', unbalanced USING ERRCODE = 'check_violation';
    END IF;
    SELECT n.posting_id, n.ledger_account_id INTO orphan FROM new_entries n
    WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.posting_id = n.posting_id)
       OR NOT EXISTS (SELECT 1 FROM ledger_accounts a
                      WHERE a.ledger_account_id = n.ledger_account_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry of posting % names a missing posting or ledger account %',
            orphan.posting_id, orphan.ledger_account_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
