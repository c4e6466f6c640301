-- invoices_figures_of_this_invoice (0016) compares the record's kind, account and total with the
-- row. A record without one of those fields makes its comparison NULL, the whole CHECK NULL, and a
-- CHECK that is NULL passes: '{"figures":1}' with its hash was accepted. Now a record must have
-- all three and each must equal the row's; invoices without figures (issued before 0016, NULL)
-- are still accepted (invoices_figures_recorded, NOT VALID, keeps new rows from being one).
-- Every row the code inserted since 0016 holds the three fields, so the constraint validates.
ALTER TABLE invoices
    DROP CONSTRAINT invoices_figures_of_this_invoice,
    ADD CONSTRAINT invoices_figures_of_this_invoice CHECK (
        figures IS NULL
        OR coalesce(json_typeof(figures) = 'object'
                    AND figures->>'kind' = kind
                    AND figures->>'account_id' = account_id
                    AND (figures->>'total')::numeric = total, false));
