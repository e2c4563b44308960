"""The issue's bounds on `--mode simulate` figures (docs/replay.md, "How far it is right"), one way for
the tests and the bench: calibration (the recorded router simulated against the recording: share within
2 pp, latency p50 and p99 within 15%) and prediction (another router simulated against its real run:
5 pp, 25%)."""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

CALIBRATION = {"share_pp": 2.0, "latency": 0.15}
PREDICTION = {"share_pp": 5.0, "latency": 0.25}


def misses(pairs: Iterable[Tuple[str, Optional[dict], dict]], share_pp: float, latency: float,
           requests: Optional[int] = None) -> List[str]:
    """The bounds missed, one line each (none: all hold), by (name, simulated figures, real figures):
    a replica's share (deployments have none) within `share_pp` percentage points, latency p50 and p99
    within `latency` (a fraction) of the real one.

    With `requests` (how many each side routed), a share is also allowed three standard deviations of
    the difference between two independent samples of that many requests: a randomized router's shares
    in a short recording and in one simulated run differ by that much by chance alone (seen in CI: 2.2 pp
    for the uniform router over a 12 s recording of more than 1,000 requests, where one such standard
    deviation is about 1.8 pp)."""
    out = []
    for name, simulated, real in pairs:
        if simulated is None:
            out.append(f"{name}: not simulated")
            continue
        bound_pp = share_pp
        if "share" in real and requests:
            p = real["share"]
            bound_pp = max(share_pp, 300 * math.sqrt(2 * p * (1 - p) / requests))
        if "share" in real and abs(simulated["share"] - real["share"]) * 100 > bound_pp:
            out.append(f"{name}: share {simulated['share']:.3f} simulated, {real['share']:.3f} real")
        for q in ("p50", "p99"):
            got, want = simulated["latency_ms"][q], real["latency_ms"][q]
            if want and abs(got - want) / want > latency:
                out.append(f"{name}: latency {q} {got:.1f} ms simulated, {want:.1f} ms real")
    return out


def calibration_pairs(result: dict) -> List[Tuple[str, Optional[dict], dict]]:
    """Each replica's and deployment's recorded router simulated, with what was recorded."""
    return [(name, row["recorded_simulated"], row["recorded"]) for d in result["deployments"]
            for name, row in [*((r["replica_id"], r) for r in d["replicas"]), (f"{d['app']}/{d['deployment']}", d)]]
