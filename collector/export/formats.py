"""Export writers: Arrow record batches in, the bytes of a CSV, JSON Lines or Parquet file out.

Each writer is fed one record batch at a time and returns the bytes it
produced so far, so that an export streams: to a file, or to an HTTP
response. Parquet keeps Arrow's types (times as timestamp[us, UTC], nested
lists and structs, labels as a map). The text formats write times as
ISO-8601 UTC; CSV writes nested values (lists, structs, maps) as JSON text
and booleans as true/false, which pandas and DuckDB read as booleans.

CSV is the format spreadsheets open, and a spreadsheet takes a cell that
begins with `=`, `+`, `-`, `@`, a tab or a carriage return for a formula
(CSV injection): a text value beginning so (an app name or a replica id
like `=HYPERLINK(...)`) is written with a `'` before it, OWASP's rule.
Numbers (`-1.5`) are never changed, nor JSON text (it begins with `[` or
`{`); Parquet and JSON Lines keep every value as recorded.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, Iterator, List

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson",
               "parquet": "application/vnd.apache.parquet"}

_json = msgspec.json.Encoder()


class _TextWriter:
    def __init__(self, schema: pa.Schema):
        self.schema = schema
        # Map columns come out of Arrow as lists of pairs: written as objects.
        self._maps = [name for name in schema.names if isinstance(schema.field(name).type, pa.MapType)]
        self._times = [name for name in schema.names if pa.types.is_timestamp(schema.field(name).type)]

    def _rows(self, batch: pa.RecordBatch) -> List[Dict[str, Any]]:
        rows = batch.to_pylist()
        for row in rows:
            for name in self._times:
                if row[name] is not None:
                    row[name] = row[name].isoformat(timespec="microseconds").replace("+00:00", "Z")
            for name in self._maps:
                if row[name] is not None:
                    row[name] = dict(row[name])
        return rows

    def close(self) -> bytes:
        return b""


# What a spreadsheet takes for the start of a formula, and its neutralized form.
_FORMULA_START = r"^([=+\-@\t\r])"
_AS_TEXT = r"'\1"


class CsvWriter(_TextWriter):
    def __init__(self, schema: pa.Schema):
        super().__init__(schema)
        self._nested = [name for name in schema.names if pa.types.is_nested(schema.field(name).type)]
        self._texts = [name for name in schema.names if pa.types.is_string(schema.field(name).type)]
        self._buffer = io.StringIO()
        # CR LF, as RFC 4180 has it: then a value with a lone CR is quoted too
        # (before Python 3.12, the csv module quotes only the line end's characters).
        self._csv = csv.writer(self._buffer, lineterminator="\r\n")
        self._csv.writerow(schema.names)

    def write(self, batch: pa.RecordBatch) -> bytes:
        for name in self._texts:
            column = batch.schema.get_field_index(name)
            batch = batch.set_column(column, name, pc.replace_substring_regex(
                batch.column(column), pattern=_FORMULA_START, replacement=_AS_TEXT))
        for row in self._rows(batch):
            for name in self._nested:
                if row[name] is not None:
                    row[name] = _json.encode(row[name]).decode()
            self._csv.writerow(["true" if v is True else "false" if v is False else v for v in row.values()])
        return self._drain()

    def close(self) -> bytes:
        return self._drain()  # the header, when no row came

    def _drain(self) -> bytes:
        data = self._buffer.getvalue().encode()
        self._buffer.seek(0)
        self._buffer.truncate()
        return data


class JsonlWriter(_TextWriter):
    def write(self, batch: pa.RecordBatch) -> bytes:
        return b"".join(_json.encode(row) + b"\n" for row in self._rows(batch))


class _Drain(io.RawIOBase):
    """A write-only file whose contents are handed on as they are written."""

    def __init__(self):
        self._parts: List[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


# Columns (by leaf name) whose values hardly repeat: ids, times, measured ages and latencies. Dictionary
# encoding, which pays off where values repeat (names, replica ids, small numbers), makes their pages both
# slower to write and larger than plain ones (measured on 10 million decisions: the file 10% smaller, the
# write 25% faster). The values read back are the same either way.
_PLAIN = {"decision_id", "routed_id", "completed_id", "request_id", "internal_request_id", "time",
          "queue_len_age_s", "stats_age_s", "latency_ms"}


class ParquetWriter:
    """One row group per batch; the schema (with its metadata) goes in the footer.

    Min/max statistics are kept for every column, for readers that skip row
    groups on them: they cost little (about 1 KB of the footer per row group).
    What the writer holds until the footer is written is mostly its metadata
    of each column chunk (about 25 KB per row group of the decisions table,
    with or without statistics): what an export's memory grows by."""

    def __init__(self, schema: pa.Schema):
        self._sink = _Drain()
        dictionary = [path for field in schema for path in _leaf_paths(field.name, field.type)
                      if path.rsplit(".", 1)[-1] not in _PLAIN]
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd", use_dictionary=dictionary)

    def write(self, batch: pa.RecordBatch) -> bytes:
        self._writer.write_batch(batch)
        return self._sink.drain()

    def close(self) -> bytes:
        self._writer.close()
        return self._sink.drain()


def _leaf_paths(path: str, type_: pa.DataType) -> Iterator[str]:
    """The Parquet leaf columns of a column, named as the writer's per-column options name them."""
    if pa.types.is_map(type_):
        yield from _leaf_paths(f"{path}.key_value.key", type_.key_type)
        yield from _leaf_paths(f"{path}.key_value.value", type_.item_type)
    elif pa.types.is_list(type_):
        yield from _leaf_paths(f"{path}.list.element", type_.value_type)
    elif pa.types.is_struct(type_):
        for field in type_:
            yield from _leaf_paths(f"{path}.{field.name}", field.type)
    else:
        yield path


WRITERS = {"csv": CsvWriter, "jsonl": JsonlWriter, "parquet": ParquetWriter}
