"""`routelens tail`: decisions as they are stored, one line each, from a
collector's `GET /v1/tail` stream (Server-Sent Events; `collector.api.tail`):
every decision stored in its database, whichever worker or collector stored it.

Only the standard library: it reads a collector over HTTP and needs nothing
of the server's (the command imports nothing else for it)."""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from datetime import datetime, timezone
from typing import Dict, Iterator, List, Optional, TextIO, Tuple

from .errors import ConnectionFailed, UsageError


def tail_path(base_path: str, args) -> str:
    query: List[Tuple[str, str]] = []
    for name, values in (("app", args.app), ("deployment", args.deployment), ("router_class", args.router_class),
                         ("replica", args.replica), ("label", args.label), ("request_id", [args.request_id]),
                         ("model_id", [args.model_id]), ("reason", args.reason)):
        query.extend((name, value) for value in values if value is not None)
    return f"{base_path.rstrip('/')}/v1/tail" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def open_stream(url: str, token: Optional[str], path_of) -> http.client.HTTPResponse:
    """The collector's answer to `GET /v1/tail`, once it says 200; else ConnectionFailed saying why."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r}: give http(s)://HOST:PORT of a routelens collector")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=60)  # keep-alive comments come every 15 s
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("GET", path_of(parts.path), headers=headers)
        response = connection.getresponse()
    except OSError as exc:
        raise ConnectionFailed(f"cannot reach {url}: {exc} (is a collector running there? --url)") from None
    if response.status == 401:
        raise ConnectionFailed(f"{url} wants its token: give --token or set ROUTELENS_TOKEN")
    if response.status != 200:
        detail = response.read(500).decode(errors="replace")
        raise ConnectionFailed(f"{url} answered {response.status}: {detail}")
    return response


def events(lines) -> Iterator[Tuple[str, str]]:
    """(event name, data) of each Server-Sent Event in a stream of lines (bytes)."""
    name, data = "message", []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue  # a comment: keep-alive
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def outcome_text(record: Dict) -> str:
    if record.get("rejected"):
        return "refused"
    if record.get("ok") is False:
        return "failed" + (f" after {record['latency_ms']:.1f} ms" if record.get("latency_ms") is not None else "")
    latency = record.get("latency_ms")
    return "ok" + (f" {latency:.1f} ms" if latency is not None else "")


def line_of(record: Dict) -> str:
    """A record as one line of text."""
    kind = record["type"]
    if kind == "missed":
        return f"... {record['count']} events missed: this reader fell behind, and goes on from the newest"
    if kind == "unavailable":
        return f"... the collector cannot read its database now: {record['detail']}"
    head = f"{when(record['ts'])}  {record['app']}/{record['deployment']}"
    if kind == "decision":
        ranking = " ".join("[" + " ".join(rank) + "]" for rank in record["ranks"])
        text = f"{head}  {record['request_id'] or '-'}  {ranking}"
        if record["replica"] is not None:
            rank = "?" if record["rank"] is None else record["rank"]
            text += f"  -> {record['replica']} (rank {rank})"
            if record["own_ranking"] is False:
                text += " FIFO hand-off"
        if record["outcome"] is not None:
            text += f"  {outcome_text(record['outcome'])}"
        return text
    if kind == "routed":
        rank = "?" if record["rank"] is None else record["rank"]
        handoff = " FIFO hand-off" if record["own_ranking"] is False else ""
        return f"{head}  {record['request_id'] or '-'}  -> {record['replica']} (rank {rank}){handoff}" \
               f"  decision {(record['decision_id'] or '?')[:8]}"
    return f"{head}  {record['internal_request_id'] or '-'}  {record['replica']}: {outcome_text(record)}" + \
        (f"  decision {record['decision_id'][:8]}" if record.get("decision_id") else "")


def follow(response, out: TextIO, as_json: bool, err: TextIO = sys.stderr) -> None:
    """Write each record of the stream to `out` as it comes, until the stream ends."""
    for name, data in events(response):
        record = json.loads(data)
        if name == "hello":
            if not as_json:
                err.write("routelens tail: following every decision stored; Ctrl-C to stop\n")
                err.flush()
            continue
        out.write((json.dumps(record) if as_json else line_of(record)) + "\n")
        out.flush()


def run_tail(args) -> int:
    response = open_stream(args.url, args.token, lambda base: tail_path(base, args))
    try:
        follow(response, sys.stdout, args.json)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `| head`: the reader is done
        return 0
    except OSError as exc:
        raise ConnectionFailed(f"the stream from {args.url} broke off: {exc}") from None
    raise ConnectionFailed(f"{args.url} closed the stream (the collector stopped?)")
