"""routelens collector: ingest, storage, queries and export (issue #3)."""
