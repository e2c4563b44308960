"""How deep a batch's free-form values may nest, checked at ingest.

A replica's `stats`, a decision's `attributes` and an event field this
version does not know are any JSON the tracer was given. Decoding, storing
and reading nested values recurses once per level: about a thousand levels
reach Python's recursion limit, a 500 the tracer would retry forever,
blocking its spool. Each such value may hold arrays and objects at most
`MAX_NESTING` levels deep, itself included; a deeper one is refused, naming
where (docs/design.md, wire format).
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Optional, Union

MAX_NESTING = 32
# The deepest a valid batch nests: the batch, `events`, an event, its `replicas`, a candidate,
# then a candidate's `stats`.
_BATCH_LEVELS = 5

# The tokens that tell where a JSON text is: strings (keys among them), brackets and commas.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def too_deep(value: Any, where: str) -> Optional[str]:
    """The message refusing `value` (found at `where`), or None when it nests no deeper than allowed."""
    levels = _levels(value, MAX_NESTING + 1)
    return None if levels <= MAX_NESTING else _message(where)


def _levels(value: Any, stop: int) -> int:
    """How many levels of arrays and objects `value` holds, counting no further than `stop`."""
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return 0
    if stop == 1:
        return 1
    return 1 + max((_levels(item, stop - 1) for item in items), default=0)


def too_deep_to_decode(body: bytes) -> str:
    """The message refusing a body too deep to decode at all (Python's
    recursion limit), naming the first place that nests deeper than any
    valid batch: decoded, it would have been refused by `too_deep`."""
    path: List[Union[str, int, None]] = []  # each open container's current key or index
    key_next = False
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token in (b"{", b"["):
            if len(path) > _BATCH_LEVELS + MAX_NESTING:
                break
            path.append(None if token == b"{" else 0)
            key_next = token == b"{"
        elif token in (b"}", b"]"):
            if path:
                path.pop()
        elif token == b",":
            if path and isinstance(path[-1], int):
                path[-1] += 1
            else:
                key_next = True
        elif key_next and path:
            path[-1] = _key(token)
            key_next = False
    shown = path[:_BATCH_LEVELS + 3]
    return _message("$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in shown)
                    + ("..." if len(path) > len(shown) else ""))


def _key(token: bytes) -> str:
    try:
        return json.loads(token)
    except ValueError:
        return token.decode("utf-8", "replace")[1:-1]


def _message(where: str) -> str:
    return f"{where}: nested more than {MAX_NESTING} levels deep (arrays and objects)"
