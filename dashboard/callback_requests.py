"""Callback requests the dashboard answers, checked before Dash reads them.

The page posts each callback to `<prefix>_dash-update-component` as JSON
naming the callback (`output`) and the values of its inputs and state. Dash
trusts that body: one it cannot parse (not an object, no `output`, an
unknown one, inputs of another shape) raises inside its dispatch and
answers 500. A body that is not a call of one of this dashboard's
callbacks, as declared, is refused here with 400; what the values hold is
the callbacks' own business (they validate the URL they are given).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from dash import Dash
from flask import Response, request

DISPATCH = "_dash-update-component"


def refuse_malformed_callbacks(app: Dash, prefix: str) -> None:
    """Check every callback request of `app` (served under `prefix`) before Dash dispatches it."""
    path = prefix + DISPATCH

    def check() -> Optional[Response]:
        if request.method != "POST" or request.path != path:
            return None
        problem = malformed(request.get_json(silent=True), app.callback_map)
        if problem is None:
            return None
        return Response(f"not a callback request of this dashboard: {problem}", status=400, mimetype="text/plain")

    app.server.before_request(check)


def malformed(body: Any, callbacks: Dict[str, dict]) -> Optional[str]:
    """What makes `body` other than a call of one of `callbacks` (Dash's
    callback_map), or None. Only the shape is checked: which callback, and
    its inputs and state, each naming the component and property declared."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    callback = callbacks.get(body.get("output")) if isinstance(body.get("output"), str) else None
    if callback is None:
        return "`output` names no callback"
    for key in ("inputs", "state"):
        declared = callback[key]
        given = body.get(key, [])
        if not isinstance(given, list) or len(given) != len(declared) or not all(
                isinstance(value, dict) and _names(value) == _names(spec) for value, spec in zip(given, declared)):
            return f"`{key}` are not the callback's"
    outputs = body.get("outputs", [])
    if not all(isinstance(o, dict) and _is_property(o) for o in (outputs if isinstance(outputs, list) else [outputs])):
        return "`outputs` are not component properties"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(prop, str) for prop in changed):
        return "`changedPropIds` is not a list of strings"
    return None


def _names(value: dict) -> tuple:
    return value.get("id"), value.get("property")


def _is_property(output: dict) -> bool:
    return isinstance(output.get("id"), str) and isinstance(output.get("property"), str)
