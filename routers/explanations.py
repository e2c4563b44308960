"""Decision reasons and scores: what a router says about the decision it is making.

A router (or a traced subclass of one it cannot change) calls
`self.routelens_explain(reason, **scores)` while it decides: from inside
`choose_replicas` or anything it awaits or calls. The mixin's
`choose_replicas` sets `_current` to a fresh one-slot list for the call and
reads it back when the wrapped call returns. A ContextVar, because Ray runs
each routing task's `choose_replicas` calls one after another in that task
while tasks interleave on the router loop: a coroutine's context is its
task's, so each call sees its own slot, and tasks the router starts during
the call (`asyncio.gather`, `create_task`) copy the context and see it too.

Bounded (docs/design.md): a reason of 1 to MAX_REASON_CHARS characters
(longer ones are cut), at most MAX_SCORES scores, each named in at most
MAX_SCORE_NAME_CHARS characters and a finite real number (stored as a
float). Whatever is cut or dropped, and every call made outside a decision,
is counted in `routers.faults`; nothing raises into the router.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Dict, Optional, Tuple

from .faults import faults

MAX_REASON_CHARS = 64
MAX_SCORES = 8
MAX_SCORE_NAME_CHARS = 32

# The decision being made in this context: a one-slot list the explanation goes
# into (the last call wins); None outside choose_replicas.
current: ContextVar[Optional[list]] = ContextVar("routelens_decision_explanation", default=None)

# (reason, {score name: float}), as a decision record carries it (records.D_EXPLANATION).
Explanation = Tuple[str, Dict[str, float]]


class ExplanationIgnored(ValueError):
    """What `faults` counts when an explanation is cut, dropped or made outside a decision."""


def explain(reason: Any, scores: Dict[str, Any]) -> None:
    """Attach (reason, scores) to the decision being made in this context, within the bounds."""
    slot = current.get()
    if slot is None:
        faults.record("explaining a decision outside choose_replicas",
                      ExplanationIgnored("called outside choose_replicas: the explanation is ignored"))
        return
    explanation = bounded(reason, scores)
    if explanation is not None:
        slot[0] = explanation


def bounded(reason: Any, scores: Dict[str, Any]) -> Optional[Explanation]:
    """The explanation within the bounds (None: the reason is unusable), each cut counted."""
    if not isinstance(reason, str) or not reason:
        _beyond_bounds(f"the reason must be a non-empty str, not {reason!r:.80}: the explanation is ignored")
        return None
    if len(reason) > MAX_REASON_CHARS:
        _beyond_bounds(f"a reason of {len(reason)} characters is cut to {MAX_REASON_CHARS}")
        reason = reason[:MAX_REASON_CHARS]
    kept: Dict[str, float] = {}
    for name, value in scores.items():
        if len(kept) == MAX_SCORES:
            _beyond_bounds(f"{len(scores)} scores: those after the first {MAX_SCORES} are dropped")
            break
        if len(name) > MAX_SCORE_NAME_CHARS:
            _beyond_bounds(f"the score name {name[:MAX_SCORE_NAME_CHARS]!r}... is longer than "
                           f"{MAX_SCORE_NAME_CHARS} characters: the score is dropped")
            continue
        number = _finite(value)
        if number is None:
            _beyond_bounds(f"the score {name!r} is {value!r:.80}, not a finite number: it is dropped")
            continue
        kept[name] = number
    return reason, kept


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def _beyond_bounds(message: str) -> None:
    faults.record("explaining a decision", ExplanationIgnored(message))
