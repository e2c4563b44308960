"""The collector's HTTP service: `create_app(settings)`.

- `POST /v1/events`: wire format v2 (or v1) batches (see `collector.ingest.schema`),
  stored by `collector.ingest.writer`, all or nothing;
- read endpoints over `collector.query.figures` and `collector.query.explore`, all with
  the same window and filters (`collector.api.params`);
- `/healthz`, `/metrics` (Prometheus), OpenAPI at `/docs`.

Client input never causes a 500: bad batches get 400/401/413/415/422 naming
the problem, and a database that cannot be reached gets 503 (the tracer's
exporter retries those).
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Iterator, Literal, Optional

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..export.formats import MEDIA_TYPES
from ..export.names import FORMATS, TABLES
from ..export.schema import EXPORT_SCHEMA_VERSION
from ..export.stream import ExportError, export
from ..export.stream import check as check_export
from ..ingest.schema import Invalid, TooMany, parse
from ..ingest.writer import Ingestor, SourceConflict
from ..query import explore, figures, prefixes
from ..query.filters import Filters
from ..query.tail import Follower, newest
from ..settings import Settings, parse_duration
from ..store import replays, times
from ..store.db import check_schema, head_revision, make_engine, revision_of, schema_problem, write_problem
from ..store.ids import to_bytes
from ..store.retention import Retention
from .auth import TokenAuth, allowed_hosts
from .metrics import Metrics
from .params import filters
from .tail import last_event_id as parse_last_event_id
from .tail import no_window
from .tail import stream as tail_events

JSON_TYPES = ("application/json",)
EXPORT_RETRY_AFTER_S = 5  # an export refused because the others are still streaming


class Rejected(Exception):
    """A batch refused before storage: HTTP status and reason."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


# For FastAPI to validate the parameters (and document their values).
ExportFormat = Literal[FORMATS]  # type: ignore[valid-type]
ExportTable = Literal[TABLES]  # type: ignore[valid-type]


def create_app(settings: Settings, engine: Optional[Engine] = None) -> FastAPI:
    """The collector app. Checks the database schema now, so that a server
    never starts on a database it cannot use (raises `db.DatabaseError`)."""
    engine = engine or make_engine(settings.db_url)
    check_schema(engine, settings.db_url)
    head = head_revision()
    ingestor = Ingestor(engine)
    metrics = Metrics(engine, settings.metrics_dir, settings.routing_metrics, settings.metrics_replica_limit,
                      settings.metrics_source_limit)
    retention = Retention(engine, settings.retention_s, settings.minute_rollup_retention_s,
                          settings.retention_interval_s, running=metrics.pruners)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        retention.start()
        yield
        retention.stop()

    app = FastAPI(title="routelens collector", version=__version__, lifespan=lifespan,
                  description="Ingest of routelens wire format v2 (and v1), and the read API behind the dashboard.")
    app.state.settings, app.state.engine, app.state.ingestor, app.state.metrics = settings, engine, ingestor, metrics
    app.state.retention = retention
    # Exports stream for as long as their clients take to read: each takes a slot and a connection of
    # its own (opened for it, closed after it), never one of the pool that ingest and the read API use,
    # so that exports whose clients stall cannot make those wait.
    export_engine = make_engine(settings.db_url, sqlite_cache_mb=8, pooled=False)
    if export_engine.dialect.name == "postgresql":
        # Each of an export's statements a transaction of its own (every read is a key range of its own,
        # none needs a longer one): a client that stops reading holds no snapshot, which would keep
        # PostgreSQL from reclaiming the row versions ingest's rollup upserts leave, and slow every
        # upsert after (bench/export_starvation.py: ingest p99 up to 2.6x with 4 stalled exports).
        export_engine = export_engine.execution_options(isolation_level="AUTOCOMMIT")
    export_slots = threading.BoundedSemaphore(settings.max_exports)

    auth = app.state.auth = TokenAuth(settings.token, settings.session_lifetime_s) if settings.token else None
    hosts = allowed_hosts(settings)
    if hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    def unauthorized() -> HTTPException:
        return HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                             headers={"WWW-Authenticate": "Bearer"})

    def authorized(request: Request) -> None:
        """Reading: the bearer token, or the dashboard's sign-in session."""
        if auth is not None and not auth.is_authorized(request.headers, request.cookies):
            raise unauthorized()

    def bearer_authorized(request: Request) -> None:
        """Ingest: the bearer token only (a browser's session cannot write)."""
        if auth is not None and not auth.has_bearer_token(request.headers.get("authorization")):
            raise unauthorized()

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)  # every pooled connection busy for the pool's whole timeout
    async def database_unavailable(_request: Request, exc: Exception):
        metrics.database_unavailable()
        cause = getattr(exc, "orig", None) or exc
        return JSONResponse({"detail": f"database unavailable ({type(cause).__name__}); retry later"},
                            status_code=503, headers={"Retry-After": "1"})

    def store(valid):
        result = ingestor.ingest(valid)
        metrics.count_routing(result)  # here, in ingest's thread, rather than on the event loop
        return result

    @app.post("/v1/events", dependencies=[Depends(bearer_authorized)], tags=["ingest"],
              summary="Store one batch of wire format v2 or v1 (plain or gzip JSON)")
    async def ingest(request: Request):
        started = time.perf_counter()
        try:
            body = await _read_body(request, settings.max_body_bytes)
            valid = parse(body, settings.max_events_per_batch)
        except Rejected as exc:
            metrics.rejected(exc.reason)
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        except TooMany as exc:
            metrics.rejected("too_many_events")
            return JSONResponse({"detail": str(exc)}, status_code=413)
        except Invalid as exc:
            status = 400 if str(exc).startswith("malformed JSON") else 422
            metrics.rejected("malformed" if status == 400 else "invalid")
            return JSONResponse({"detail": str(exc)}, status_code=status)
        try:
            result = await run_in_threadpool(store, valid)
        except SourceConflict as exc:
            metrics.rejected("source_conflict")
            return JSONResponse({"detail": str(exc)}, status_code=409)
        metrics.ingested(result, time.perf_counter() - started)
        return {"stored": result.stored, "duplicates": result.duplicates}

    read = [Depends(authorized)]

    def with_connection(function, *args, **kwargs):
        with engine.connect() as connection:
            return function(connection, *args, **kwargs)

    def figure_endpoint(figure):
        """A read endpoint answering `figure(connection, filters)`."""
        def endpoint(f: Filters = Depends(filters)):
            return with_connection(figure, f)
        return endpoint

    # The panels' figures: one endpoint each, over the same window and filters.
    for path, figure, summary in (
        ("/v1/deployments", figures.deployments, "Apps, deployments, routers (class, labels) and their sources"),
        ("/v1/summary", figures.summary, "The overview's figures"),
        ("/v1/distribution", figures.distribution, "Routed requests per replica, idle members included; imbalance"),
        ("/v1/staleness", figures.staleness, "Age of the routing_stats decisions ranked on, per replica"),
        ("/v1/rank-hits", figures.rank_hits,
         "Share of routed requests by rank; hand-offs, rejections, decisions per request"),
        ("/v1/prefix-affinity", prefixes.prefix_affinity,
         "Per prefix group (LLM routers): the share of its requests on its top replica, groups split across "
         "replicas over time, the match rate seen"),
    ):
        app.add_api_route(path, figure_endpoint(figure), methods=["GET"], name=figure.__name__,
                          dependencies=read, tags=["read"], summary=summary)

    @app.get("/v1/sources", dependencies=read, tags=["read"],
             summary="Traced router instances with events produced, dropped by reason, and lost batches")
    def sources(f: Filters = Depends(filters)):
        with engine.connect() as connection:
            return {"sources": figures.sources_in(connection, f, figures.scope(connection, f))}

    @app.get("/v1/timeseries", dependencies=read, tags=["read"],
             summary="Counters per time step (whole minutes or hours), in total or per replica")
    def timeseries(f: Filters = Depends(filters),
                   step: Optional[str] = Query(None, description="step, e.g. 1m, 15m, 1h (default: ~100 points)"),
                   per_replica: bool = Query(False)):
        step_s = _duration_param("step", step) if step else None
        return with_connection(figures.timeseries, f, step=step_s, per_replica=per_replica)

    @app.get("/v1/decisions", dependencies=read, tags=["read"],
             summary="Decisions of the window, newest first, with their outcome")
    def decision_list(f: Filters = Depends(filters), cursor: Optional[str] = None,
                      limit: int = Query(50, ge=1, le=explore.MAX_PAGE)):
        if cursor is not None:
            _uuid_param("cursor", cursor)
        return with_connection(explore.decisions_page, f, cursor=cursor, limit=limit)

    @app.get("/v1/decisions/{decision_id}", dependencies=read, tags=["read"],
             summary="One decision: its ranking with each candidate's inputs, its routed and completed events")
    def decision(decision_id: str):
        _uuid_param("decision_id", decision_id)
        found = with_connection(explore.decision_detail, decision_id)
        if found is None:
            raise HTTPException(404, f"no decision {decision_id}")
        return found

    @app.get("/v1/replays", dependencies=read, tags=["replay"],
             summary="Stored replays (made by `routelens replay`), newest first, without their results")
    def replay_list(limit: int = Query(50, ge=1, le=replays.MAX_LIST)):
        return {"replays": with_connection(replays.listing, limit)}

    @app.get("/v1/replays/{replay_id}", dependencies=read, tags=["replay"],
             summary="One stored replay: the router, window, filters and its whole result (docs/replay.md)")
    def replay(replay_id: str):
        found = with_connection(replays.read, _uuid_param("replay_id", replay_id, "a replay id"))
        if found is None:
            raise HTTPException(404, f"no replay {replay_id}")
        return found

    @app.get("/v1/export", dependencies=read, tags=["export"],
             summary="The window's decision log as CSV, JSON Lines or Parquet, streamed (schema: docs/export.md)")
    def export_log(f: Filters = Depends(filters),
                   format: ExportFormat = Query("parquet", description="file format"),
                   what: ExportTable = Query(
                       "decisions", description="decisions (outcome joined), candidates, routed, completed, or "
                                                "events (wire-format batches for `routelens import`; jsonl)")):
        try:
            check_export(f, what, format)
        except ExportError as exc:
            raise HTTPException(422, str(exc)) from None
        if not export_slots.acquire(blocking=False):
            raise HTTPException(503, f"{settings.max_exports} exports are streaming, the most at once; retry later",
                                headers={"Retry-After": str(EXPORT_RETRY_AFTER_S)})
        try:
            # Reach the database before the 200 goes out: a database that is away
            # must be a 503 (retry later), not a 200 whose body breaks off at once.
            with export_engine.connect():
                pass
        except BaseException:
            export_slots.release()
            raise
        filename = f"routelens-{what}-{int(f.since)}-{int(f.until)}.{format}"
        return _ExportResponse(_export_stream(export_engine, f, what, format), export_slots.release,
                               media_type=MEDIA_TYPES[format], headers={
                                   "Content-Disposition": f'attachment; filename="{filename}"',
                                   "X-Routelens-Export-Schema": str(EXPORT_SCHEMA_VERSION)})

    @app.get("/v1/tail", dependencies=read, tags=["read"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "A stream that never ends"}},
             summary="Decisions as they are stored, live (Server-Sent Events): each with its ranking, chosen "
                     "replica, rank and outcome when they came with it, later outcomes as events of their own")
    def tail_stream(request: Request, f: Filters = Depends(filters), last_event_id: Optional[str] = Header(
            None, description="resume after this event id (the number of a batch this stream sent)")):
        """Every decision stored, by any worker or collector on this database, that the filters pass:
        a decision if it matches them all; a `routed` or `completed` event of a decision sent before
        (or stored before the stream started) if its replica and its decision do. Events: `hello`
        (`after`: the batch it starts after), `decision`, `routed` and `completed`, `missed` (how many
        events this reader fell behind by and skipped: those of its routers, the other filters not
        applied), `unavailable` (the database cannot be read now). It has no window (`window`, `since`
        and `until` are refused, 422): it starts now, or after `Last-Event-ID` (no more than
        `--tail-max-behind` back)."""
        no_window(request.query_params)
        after = parse_last_event_id(last_event_id)
        with engine.connect() as connection:  # before the 200: a database away is a 503 (retry later)
            head = newest(connection)
        follower = Follower(f, settings.tail_max_behind_s, head if after is None else min(after, head))
        return StreamingResponse(
            tail_events(engine, follower, {"after": follower.last}, metrics.tail_readers),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz", tags=["operations"], summary="Whether ingest can succeed: the database reachable, "
                                                     "routelens', at this version's schema, writable")
    def healthz():
        try:
            with engine.connect() as connection:  # one connection: reading the revision reaches the database
                revision = revision_of(connection)
                problem = schema_problem(connection, revision) if revision == head else \
                    f"the database schema is {revision}, not this routelens' {head}"
                problem = problem or write_problem(connection)
        except Exception as exc:
            problem = type(exc).__name__
        if problem:
            return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
        return {"status": "ok", "database": engine.dialect.name, "schema": revision, "version": __version__}

    @app.get("/metrics", dependencies=read, tags=["operations"], summary="Prometheus metrics")
    def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


class _ExportResponse(StreamingResponse):
    """An export's streamed response, which gives its slot back when it ends,
    however it ends: its body is closed first (the export's connection given
    back), even if the client left before the body was begun."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self._release()


async def _export_stream(engine: Engine, f: Filters, what: str, fmt: str) -> AsyncIterator[bytes]:
    """The export's bytes, each chunk made in a worker thread. When the client
    goes away the export is closed at once (its reader thread stopped, its
    connection returned): Starlette would leave a plain generator to the
    garbage collector, holding a connection and, on SQLite, a read snapshot."""
    chunks = _export_chunks(engine, f, what, fmt)
    try:
        while True:
            data = await run_in_threadpool(next, chunks, None)
            if data is None:
                return
            yield data
    finally:
        with anyio.CancelScope(shield=True):  # the request may be cancelled: close anyway
            await run_in_threadpool(chunks.close)


def _export_chunks(engine: Engine, f: Filters, what: str, fmt: str) -> Iterator[bytes]:
    with engine.connect() as connection:
        yield from export(connection, f, what, fmt)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, inflated when gzip; refused past `limit` bytes, on the
    wire or inflated, without ever holding more than that."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES:
        raise Rejected(415, "content_type", f"Content-Type must be application/json, not {content_type or 'missing'!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise Rejected(415, "content_encoding", f"Content-Encoding {encoding!r} is not supported (use gzip)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"body of {declared} bytes is over the limit of {limit}")
    inflater = _Gunzip(limit) if encoding == "gzip" else None
    parts, size = [], 0
    try:
        async for chunk in request.stream():
            if inflater is not None:
                chunk = inflater.feed(chunk)
            size += len(chunk)
            if size > limit:
                raise Rejected(413, "too_large", f"body is over the limit of {limit} bytes")
            parts.append(chunk)
        if inflater is not None and not inflater.complete:
            raise Rejected(400, "malformed", "gzip body is truncated")
    except zlib.error as exc:
        raise Rejected(400, "malformed", f"body is not valid gzip: {exc}") from None
    return b"".join(parts)


class _Gunzip:
    """Inflates a gzip body as it arrives, never to more than `limit` bytes.

    A gzip stream may hold several members one after another (RFC 1952;
    gunzip reads them all): each is inflated in turn. Anything after a member
    that does not begin another one is an error, not ignored.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._size = 0
        self._member = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._member.eof:
                self._member = zlib.decompressobj(wbits=31)
            piece = self._member.decompress(data, self._limit + 1 - self._size)
            self._size += len(piece)
            if self._member.unconsumed_tail or self._size > self._limit:  # more output than the limit allows
                raise Rejected(413, "too_large", f"gzip body inflates to more than {self._limit} bytes")
            out.append(piece)
            data = self._member.unused_data
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return self._member.eof


def _uuid_param(name: str, value: str, what: str = "a decision id") -> str:
    """The UUID in canonical form; 422 for a value that is not one."""
    try:
        return str(uuid.UUID(bytes=to_bytes(value)))
    except ValueError:
        raise HTTPException(422, f"{name}: not {what} (a UUID): {value[:80]!r}") from None


def _duration_param(name: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None
    if seconds > times.END:  # (infinite, too) the database could not compute with it
        raise HTTPException(422, f"{name}: {value[:80]!r} is longer than any window ({times.END:.0f} s at most)")
    return seconds
