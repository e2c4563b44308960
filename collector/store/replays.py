"""Replays' results (`replays` table): written by `routelens replay`, read by the API.

A replay is made by the command, which runs the user's router; the
collector only lists and serves what was stored. The record a reader gets
(`read`) is the same whoever asks: the command prints it with --json, and
GET /v1/replays/{id} answers it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Optional

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from ..query.explore import iso
from ..query.filters import Filters
from .db import writer
from .models import Replay

MAX_LIST = 500


def filters_of(f: Filters) -> Dict[str, Any]:
    """The filters, as the read API's query string takes them (the window apart), those given only."""
    named = {"app": list(f.apps), "deployment": list(f.deployments), "router_class": list(f.router_classes),
             "label": [f"{k}={v}" for k, v in f.labels], "replica": list(f.replicas),
             "request_id": f.request_id, "model_id": f.model_id, "reason": list(f.reasons)}
    return {name: value for name, value in named.items() if value}


def save(engine: Engine, *, mode: str, router_class: str, router_kwargs: Dict[str, Any], seed: int, runs: int,
         f: Filters, result: Dict[str, Any]) -> str:
    """Stores a replay's result, on a connection and in a transaction of its own; its id."""
    replay_id = str(uuid.uuid4())
    with engine.connect() as conn, writer(conn).begin():
        conn.execute(insert(Replay).values(
            id=replay_id, created_at=time.time(), mode=mode, router_class=router_class,
            router_kwargs=json.dumps(router_kwargs), seed=seed, runs=runs, since=f.since, until=f.until,
            filters=json.dumps(filters_of(f)), result=json.dumps(result)))
    return replay_id


_SUMMARY = (Replay.id, Replay.created_at, Replay.mode, Replay.router_class, Replay.router_kwargs, Replay.seed,
            Replay.runs, Replay.since, Replay.until, Replay.filters)


def listing(conn: Connection, limit: int = 50) -> List[dict]:
    """The stored replays, newest first, without their results."""
    rows = conn.execute(select(*_SUMMARY).order_by(Replay.created_at.desc(), Replay.id)
                        .limit(max(1, min(int(limit), MAX_LIST))))
    return [_summary(row) for row in rows]


def read(conn: Connection, replay_id: str) -> Optional[dict]:
    """One replay, its result included; None if there is none of that id."""
    row = conn.execute(select(*_SUMMARY, Replay.result).where(Replay.id == replay_id)).first()
    if row is None:
        return None
    return {**_summary(row), "result": json.loads(row.result)}


def _summary(row) -> dict:
    return {"id": row.id, "created_at": row.created_at, "time": iso(row.created_at), "mode": row.mode,
            "router_class": row.router_class, "router_kwargs": json.loads(row.router_kwargs), "seed": row.seed,
            "runs": row.runs, "window": {"since": row.since, "until": row.until}, "filters": json.loads(row.filters)}
