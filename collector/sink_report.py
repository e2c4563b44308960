"""A summary of JSON Lines sink files, per the definitions in DESIGN.md.

Until the collector's query layer exists (#3), this is how `routelens demo`
shows what the tracer recorded: distribution, rank hits, hand-offs,
rejections and stats staleness, per deployment.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional


@dataclass
class DeploymentSummary:
    name: str
    decisions: int = 0
    routed_per_replica: Counter = field(default_factory=Counter)
    members: set = field(default_factory=set)
    rank_hits: Counter = field(default_factory=Counter)  # rank (or "unknown") -> routed requests
    handoffs: int = 0
    rejections_per_replica: Counter = field(default_factory=Counter)
    stats_ages: Dict[str, List[float]] = field(default_factory=lambda: defaultdict(list))  # source -> ages
    dropped: Counter = field(default_factory=Counter)

    @property
    def routed(self) -> int:
        return sum(self.routed_per_replica.values())

    def jain_index(self) -> Optional[float]:
        """Jain's fairness index of routed requests over every member replica."""
        counts = [self.routed_per_replica.get(r, 0) for r in self.members | set(self.routed_per_replica)]
        if not counts or not any(counts):
            return None
        return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(paths: Iterable[str]) -> Dict[str, DeploymentSummary]:
    summaries: Dict[str, DeploymentSummary] = {}
    latest_dropped: Dict[str, Dict[str, int]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                batch = json.loads(line)
                source = batch["source"]
                name = f"{source['app']}/{source['deployment']}"
                summary = summaries.setdefault(name, DeploymentSummary(name))
                latest_dropped[source["source_id"]] = (name, batch["dropped"])
                for event in batch["events"]:
                    _add(summary, event)
    for name, dropped in latest_dropped.values():
        summaries[name].dropped.update(dropped)
    return summaries


def _add(summary: DeploymentSummary, event: dict) -> None:
    kind = event["type"]
    if kind == "decision":
        summary.decisions += 1
        for inputs in event["replicas"].values():
            if inputs["stats_age_s"] is not None:
                summary.stats_ages[inputs["stats_age_source"]].append(inputs["stats_age_s"])
    elif kind == "routed":
        summary.routed_per_replica[event["replica_id"]] += 1
        summary.rank_hits[event["rank"] if event["rank"] is not None else "unknown"] += 1
        summary.handoffs += event["own_ranking"] is False
    elif kind == "completed" and event["rejected"]:
        summary.rejections_per_replica[event["replica_id"]] += 1
    elif kind == "replicas":
        summary.members.update(m["replica_id"] for m in event["replicas"])


def sink_files(directory: str) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, "*.jsonl")))


def render(summaries: Dict[str, DeploymentSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for summary in summaries.values():
        if not summary.routed:
            continue
        table = Table(title=f"{summary.name}: {summary.routed} routed, {summary.decisions} decisions")
        table.add_column("replica")
        table.add_column("routed", justify="right")
        table.add_column("share", justify="right")
        table.add_column("rejections", justify="right")
        for replica in sorted(summary.members | set(summary.routed_per_replica)):
            n = summary.routed_per_replica.get(replica, 0)
            table.add_row(replica, str(n), f"{n / summary.routed:.1%}",
                          str(summary.rejections_per_replica.get(replica, 0)))
        console.print(table)
        hits = ", ".join(f"rank {rank}: {n / summary.routed:.1%}" for rank, n in sorted(
            summary.rank_hits.items(), key=lambda item: str(item[0])))
        jain = summary.jain_index()
        console.print(f"  rank hits: {hits}; FIFO hand-offs: {summary.handoffs / summary.routed:.1%}; "
                      f"Jain's index: {jain if jain is None else round(jain, 3)}")
        for source, ages in sorted(summary.stats_ages.items()):
            console.print(f"  stats staleness ({source}): p50 {statistics.median(ages):.2f}s, "
                          f"p95 {percentile(ages, 0.95):.2f}s, max {max(ages):.2f}s over {len(ages)} samples")
        if summary.dropped:
            console.print(f"  [bold red]dropped events: {dict(summary.dropped)}[/]")
