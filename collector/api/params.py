"""The window and filters every read endpoint takes, as one FastAPI dependency."""

from __future__ import annotations

from typing import List, Optional

from fastapi import HTTPException, Query

from ..query.filters import FilterError, Filters, build_filters


def filters(
    window: Optional[str] = Query(None, description="window ending at `until` (default now): 15m, 1h, 24h, 7d"),
    since: Optional[str] = Query(None, description="window start: epoch seconds or ISO-8601 (overrides window)"),
    until: Optional[str] = Query(None, description="window end: epoch seconds or ISO-8601 (default: now)"),
    app: List[str] = Query([], description="Serve app name (repeat for several)"),
    deployment: List[str] = Query([], description="deployment name (repeat for several)"),
    router_class: List[str] = Query([], description="router class, module.QualName (repeat for several)"),
    label: List[str] = Query([], description="router label key=value (repeat: all must hold)"),
    replica: List[str] = Query([], description="replica id (repeat for several)"),
    request_id: Optional[str] = Query(None, description="request id or internal request id (drill-down)"),
    model_id: Optional[str] = Query(None, description="multiplexed model id (drill-down)"),
    reason: List[str] = Query([], description="the router's reason for a decision (drill-down, per-reason figures;"
                                             " repeat for several)"),
) -> Filters:
    try:
        return build_filters(window, since, until, app, deployment, router_class, label, replica, request_id,
                             model_id, reason)
    except FilterError as exc:
        raise HTTPException(422, str(exc)) from None
