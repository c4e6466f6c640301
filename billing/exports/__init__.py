"""Admin exports: statements, invoices, fleet files and usage reports (docs/exports.md).

``statements`` computes an account's statement for a period from the ledger (SQL), ``formats``
writes it as CSV, XLSX, Parquet or HTML, ``invoices`` issues numbered immutable invoices,
``fleet`` exports every account memory-bounded, ``report`` draws usage charts.
"""
