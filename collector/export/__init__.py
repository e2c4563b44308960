"""The export: decision logs out of the database as CSV, JSON Lines or Parquet.

Entry points: `stream.check` and `stream.export`. The tables and their
columns: `schema`; each table's record batches: `tables`, from rows read in
chunks (`chunks`, `arrow_reader`, `sqlite_reader`), matched to their outcome
(`outcomes`) and converted to Arrow (`convert`, `rankings`); the file
formats: `formats`; the `events` table: `wire_batches`.

Nothing is imported here: `python -m routelens.collector.export.sqlite_reader`
imports this package, and must not load pyarrow.
"""
