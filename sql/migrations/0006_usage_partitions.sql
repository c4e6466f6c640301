-- Monthly range partitions of usage_events by recorded_at (UTC months), idempotency preserved in a
-- narrow non-partitioned key table, and payload retention columns. Why recorded_at and a key
-- table: docs/operations.md "PostgreSQL: partitions and idempotency".
--
-- * usage_event_keys (event_id PRIMARY KEY, recorded_at): the exactly-once key. A partitioned
--   table cannot have a unique index without its partition key, so the key lives here.
-- * usage_events: PRIMARY KEY (event_id, recorded_at), and a statement trigger that claims the
--   key of every inserted row (one INSERT .. SELECT per statement, from the transition table).
--   An insert path may claim keys first (INSERT .. ON CONFLICT (event_id) DO NOTHING on
--   usage_event_keys, then insert the rows it claimed: sql/queries/usage.sql); the trigger then
--   finds them. Any other path (COPY, a plain INSERT) gets its keys claimed by the trigger, and a
--   duplicate of an event recorded by another transaction fails with unique_violation on
--   usage_event_keys_pkey; in the one case the trigger skips (a key with the very same
--   recorded_at, i.e. the same transaction timestamp) the partition's own primary key
--   (event_id, recorded_at) refuses the row. At most one row per event_id, on every path.
-- * The new table is created LIKE the old one, so every column earlier migrations added is kept;
--   secondary indexes and triggers are re-created from their definitions.

CREATE TABLE usage_event_keys (
    event_id     text PRIMARY KEY,
    recorded_at  timestamptz NOT NULL DEFAULT now()   -- the transaction's, as usage_events'
);
CREATE TRIGGER usage_event_keys_append_only BEFORE UPDATE OR DELETE ON usage_event_keys
    FOR EACH ROW EXECUTE FUNCTION billing_forbid_change();
CREATE TRIGGER usage_event_keys_no_truncate BEFORE TRUNCATE ON usage_event_keys
    FOR EACH STATEMENT EXECUTE FUNCTION billing_forbid_change();

-- The partition of a month: usage_events_yYYYYmMM, [first instant, first instant of next) in UTC.
CREATE FUNCTION billing_usage_partition_name(p_month date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'usage_events_' || to_char(p_month, '"y"YYYY"m"MM') $$;

-- Create the partitions of every month from p_from's month to p_months_ahead months after the
-- current one; returns the names it created (none when they all exist). Idempotent.
CREATE FUNCTION billing_ensure_usage_partitions(p_from timestamptz, p_months_ahead int)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', p_from AT TIME ZONE 'UTC')::date;
    last date := (date_trunc('month', now() AT TIME ZONE 'UTC')
                  + make_interval(months => p_months_ahead))::date;
    name text;
BEGIN
    WHILE m <= last LOOP
        name := billing_usage_partition_name(m);
        IF to_regclass(quote_ident(name)) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                           name, (m::timestamp AT TIME ZONE 'UTC'),
                           ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
            RETURN NEXT name;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
END $$;

-- Claim the idempotency key of every inserted event that does not hold it yet (one statement per
-- insert statement, keys in event_id order so concurrent writers lock them in the same order).
CREATE FUNCTION billing_claim_event_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_event_keys (event_id, recorded_at)
    SELECT n.event_id, n.recorded_at FROM new_events n
    WHERE NOT EXISTS (SELECT 1 FROM usage_event_keys k
                      WHERE k.event_id = n.event_id AND k.recorded_at = n.recorded_at)
    ORDER BY n.event_id;
    RETURN NULL;
END $$;

DO $$
DECLARE
    indexes text[];
    triggers text[];
    enabling text[];
    def text;
    oldest timestamptz;
BEGIN
    -- Secondary indexes and user triggers of the table as it is now (earlier migrations, and any
    -- other branch's), to re-create on the partitioned table. Their text names usage_events.
    SELECT coalesce(array_agg(pg_get_indexdef(i.indexrelid)), '{}') INTO indexes
        FROM pg_index i WHERE i.indrelid = 'usage_events'::regclass AND NOT i.indisprimary;
    SELECT coalesce(array_agg(pg_get_triggerdef(t.oid)), '{}'),
           coalesce(array_agg(format('ALTER TABLE usage_events %s TRIGGER %I',
                                     CASE t.tgenabled WHEN 'D' THEN 'DISABLE'
                                                      WHEN 'R' THEN 'ENABLE REPLICA'
                                                      WHEN 'A' THEN 'ENABLE ALWAYS' END,
                                     t.tgname)) FILTER (WHERE t.tgenabled <> 'O'), '{}')
        INTO triggers, enabling
        FROM pg_trigger t WHERE t.tgrelid = 'usage_events'::regclass AND NOT t.tgisinternal;

    ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
    CREATE TABLE usage_events (LIKE usage_events_unpartitioned INCLUDING ALL EXCLUDING INDEXES)
        PARTITION BY RANGE (recorded_at);

    SELECT min(recorded_at) INTO oldest FROM usage_events_unpartitioned;
    PERFORM billing_ensure_usage_partitions(coalesce(least(oldest, now()), now()), 3);

    INSERT INTO usage_event_keys (event_id, recorded_at)
        SELECT event_id, recorded_at FROM usage_events_unpartitioned;
    INSERT INTO usage_events SELECT * FROM usage_events_unpartitioned;
    DROP TABLE usage_events_unpartitioned;

    ALTER TABLE usage_events ADD PRIMARY KEY (event_id, recorded_at);
    FOREACH def IN ARRAY indexes LOOP
        IF def LIKE 'CREATE UNIQUE%' AND def NOT LIKE '%recorded_at%' THEN
            RAISE EXCEPTION 'unique index cannot be partitioned without recorded_at: %', def;
        END IF;
        EXECUTE def;
    END LOOP;
    FOREACH def IN ARRAY triggers || enabling LOOP
        EXECUTE def;
    END LOOP;
END $$;

CREATE TRIGGER usage_events_claim_keys AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION billing_claim_event_keys();

-- The index exports need is (account_id, recorded_at) (statements, reports, the fleet export),
-- re-created above on every partition; their period filter on recorded_at also prunes partitions.
-- No other index: each one costs every insert (docs/performance.md).

-- Retention of raw payloads (billing retention run): dead letters that are no longer parked and
-- processed Stripe events may have their payload removed after the retention period; the size,
-- reason, ids and digests stay.
ALTER TABLE dead_letters ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE dead_letters ADD COLUMN payload_purged_at timestamptz;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_parked_has_payload
    CHECK (payload IS NOT NULL OR (status <> 'parked' AND payload_purged_at IS NOT NULL));
ALTER TABLE stripe_events ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE stripe_events ADD COLUMN payload_purged_at timestamptz;
