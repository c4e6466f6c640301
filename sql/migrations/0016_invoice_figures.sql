-- An issued invoice's figures, stored with it (billing/exports/figures.py).
--
-- `billing invoices show N --verify` compared the stored bytes with a new rendering from the
-- ledger. A change in how an invoice is rendered (a column added, an HTML fix, a pyarrow or
-- openpyxl upgrade) then made every invoice issued before it read DIFFERENT, the same answer a
-- change in the books gives. The figures the bytes were rendered from (amounts as exact decimal
-- strings, cents, quantities, posting ids, times) are now stored as canonical JSON with their
-- SHA-256, in the issuing transaction; --verify recomputes them from the ledger and compares.
--
-- `json`, not `jsonb`: it keeps the text exactly as written, so the hash stays checkable.
-- Invoices issued before this migration have none (NULL); every invoice inserted from now on
-- must (invoices_figures_recorded, NOT VALID: it holds for new rows, the old ones are not
-- checked). The table stays append-only: the row trigger of 0003 refuses any UPDATE or DELETE,
-- the new columns included.
ALTER TABLE invoices
    ADD COLUMN figures json,
    ADD COLUMN figures_sha256 text,
    ADD CONSTRAINT invoices_figures_hash CHECK (
        (figures IS NULL) = (figures_sha256 IS NULL)
        AND figures_sha256 = encode(sha256(convert_to(figures::text, 'UTF8')), 'hex')),
    -- a record lacking the kind, the account or the total would make the comparison NULL, and
    -- a CHECK that is NULL passes: coalesce it to false
    ADD CONSTRAINT invoices_figures_of_this_invoice CHECK (
        figures IS NULL
        OR coalesce(json_typeof(figures) = 'object'
                    AND figures->>'kind' = kind
                    AND figures->>'account_id' = account_id
                    AND (figures->>'total')::numeric = total, false));

ALTER TABLE invoices
    ADD CONSTRAINT invoices_figures_recorded CHECK (figures IS NOT NULL) NOT VALID;
