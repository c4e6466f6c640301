-- The insert trigger of usage_events (migration 0006) probes usage_event_keys once per inserted
-- row, by its primary key, whatever the planner thinks of the table's size.
--
-- Why: 0006 wrote the probe as NOT EXISTS, which the planner turns into an anti join. With a
-- large transition table, or with statistics of a key table that grew since it was last analyzed,
-- it chose a hash anti join over a sequential scan of every key ever claimed: each batch then read
-- the whole table, and the cost per event grew with the table (measured in docs/performance.md:
-- the COPY of a batch cost twice as much at 800,000 events as on an empty table). A correlated
-- scalar subquery is not turned into a join: it is one index look-up per row, O(log n).
--
-- And never a sequential scan, whatever the statistics: a session keeps the plan it made for
-- this statement, and a worker's first batch on an empty key table made one that scanned the
-- table for every row (5.4 s for a batch of 5,000 rows over 30,000 keys, measured). The function
-- plans with enable_seqscan off, so the probe is the primary key's index, always.
--
-- Same rule as before: a row whose key this transaction claimed at the same recorded_at is
-- skipped; any other row has its key claimed here, and a key claimed by another transaction (or
-- at another recorded_at) makes the insert fail with unique_violation on usage_event_keys_pkey.
CREATE OR REPLACE FUNCTION billing_claim_event_keys() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
BEGIN
    INSERT INTO usage_event_keys (event_id, recorded_at)
    SELECT n.event_id, n.recorded_at FROM new_events n
    WHERE (SELECT k.recorded_at FROM usage_event_keys k WHERE k.event_id = n.event_id)
          IS DISTINCT FROM n.recorded_at
    ORDER BY n.event_id;
    RETURN NULL;
END $$;
