-- name: lock_catalog
-- Serialise catalog loads (held until the loading transaction ends).
SELECT pg_advisory_xact_lock(7306306939211392098)

-- name: insert_price
INSERT INTO prices (model, provider, effective_from, service_tier, billable_class, unit_price, per,
                    source, loaded_by)
VALUES (%(model)s, %(provider)s, %(effective_from)s, %(service_tier)s, %(billable_class)s,
        %(unit_price)s, %(per)s, %(source)s, %(loaded_by)s)

-- name: select_prices
SELECT model, provider, effective_from, service_tier, billable_class, unit_price, per, source
FROM prices
ORDER BY model, provider, effective_from, service_tier, billable_class

-- name: catalog_revision
SELECT count(*), max(loaded_at) FROM prices
