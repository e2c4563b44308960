"""The export's file formats and tables, by name: what the command line and
the API offer, without importing pyarrow (the command's parser is built for
every subcommand)."""

FORMATS = ("csv", "jsonl", "parquet")
TABLES = ("decisions", "candidates", "routed", "completed", "events")
DECISION_TABLES = ("decisions", "candidates")  # a row per decision or per its candidate: the reason filter applies
