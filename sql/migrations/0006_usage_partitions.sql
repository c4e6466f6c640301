-- Monthly range partitions of usage_events by recorded_at (UTC months), idempotency preserved in a
-- narrow non-partitioned key table, and payload retention columns. Why recorded_at and a key
-- table: docs/operations.md "PostgreSQL: partitions and idempotency".
--
-- * usage_event_keys (event_id PRIMARY KEY, recorded_at): the exactly-once key. A partitioned
--   table cannot have a unique index without its partition key, so the key lives here; the insert
--   (sql/queries/usage.sql insert_new_events) claims keys with ON CONFLICT DO NOTHING and inserts
--   only the rows whose key it claimed.
-- * usage_events: PRIMARY KEY (event_id, recorded_at), plus a statement trigger refusing any row
--   without its key at the same recorded_at. Together: one key per event_id, and at most one row
--   per (event_id, recorded_at), hence at most one row per event_id on every insert path.
-- * The new table is created LIKE the old one, so every column earlier migrations added is kept;
--   secondary indexes and triggers are re-created from their definitions.

CREATE TABLE usage_event_keys (
    event_id     text PRIMARY KEY,
    recorded_at  timestamptz NOT NULL
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

-- Every inserted event must hold its idempotency key at the same recorded_at (one join per
-- statement, not a per-row trigger).
CREATE FUNCTION billing_check_event_keys() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.event_id INTO missing FROM new_events n
        LEFT JOIN usage_event_keys k ON k.event_id = n.event_id AND k.recorded_at = n.recorded_at
        WHERE k.event_id IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'usage event % has no usage_event_keys row at its recorded_at: claim the '
                        'key in the same statement (see insert_new_events)', missing
            USING ERRCODE = 'unique_violation';
    END IF;
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

CREATE TRIGGER usage_events_keys_claimed AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_events FOR EACH STATEMENT EXECUTE FUNCTION billing_check_event_keys();

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
