"""Reading a Server-Sent Events stream (`GET /v1/tail`) in tests, event by
event and only as far as a test needs: the stream never ends."""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator, List, Optional, Tuple

import httpx


def events(lines: Iterable[str]) -> Iterator[Tuple[str, dict, str]]:
    """(event name, record, the last event id so far) of each event of a stream's lines
    (`httpx.Response.iter_lines()`), as they come; a block that is only an id gives ("id", {}, id)."""
    name, record, event_id = None, {}, ""
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            record = json.loads(line[len("data: "):])
        elif line.startswith("id: "):
            event_id = line[len("id: "):]
        elif not line and (name or event_id):
            yield name or "id", record, event_id
            name, record = None, {}


def records_until(lines: Iterable[str], newest: int) -> List[dict]:
    """The records a stream sends up to the event id `newest` (a batch number), which it sends
    once it has read that batch, whether or not any of the batch's events were this reader's."""
    records = []
    for name, record, event_id in events(lines):
        if name not in ("hello", "id"):
            records.append(record)
        if event_id and int(event_id) >= newest:
            return records
    raise AssertionError(f"the stream ended before event id {newest}")


def open_streams(url: str, headers: Optional[dict] = None) -> int:
    """The streams of `GET /v1/tail` open in the collector at `url`, as its /metrics counts them."""
    metrics = httpx.get(url + "/metrics", headers=headers or {}, timeout=30)
    found = re.search(r"^routelens_tail_readers (\S+)$", metrics.text, re.M)
    assert metrics.status_code == 200 and found, metrics.text[:300]
    return int(float(found.group(1)))
