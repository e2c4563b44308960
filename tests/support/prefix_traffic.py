"""Chat prompts with shared system prompts, sent to the demo's fake LLM, and
what the replicas answered: the traced prefix-aware router's checks on real
Serve (tests/test_ground_truth.py) and bench/prefix_affinity.py."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any, Dict, List, Tuple

from routelens.collector.demo.apps import SYSTEM_PROMPTS, ChatRequest, chat_request
from routelens.collector.query.prefixes import Share, concentration


def prompts(n: int, groups: int, seed: int) -> List[Tuple[int, ChatRequest]]:
    """`n` chat requests, each (the index of its system prompt, the request), the
    first `groups` system prompts in Zipf proportions, each with a question of its own."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(groups)]
    out = []
    for number in range(n):
        group = rng.choices(range(groups), weights)[0]
        out.append((group, chat_request(SYSTEM_PROMPTS[group], f"Question {number}: what should I do next?")))
    return out


def send(handles: Dict[str, Any], requests: List[Tuple[int, ChatRequest]],
         concurrency: int) -> Dict[str, List[Tuple[int, str]]]:
    """Each request's (group, the replica that answered), per handle: `concurrency` requests at a time
    to every handle at once, so that deployments compared see the same requests under the same load."""
    answered: Dict[str, List[Tuple[int, str]]] = {name: [] for name in handles}
    for start in range(0, len(requests), concurrency):
        batch = requests[start:start + concurrency]
        responses = {name: [handle.remote(request) for _, request in batch] for name, handle in handles.items()}
        for name, sent in responses.items():
            answered[name].extend((group, response.result(timeout_s=60))
                                  for (group, _), response in zip(batch, sent))
    return answered


def prefix_concentration(answered: List[Tuple[int, str]]) -> float:
    """The replicas' own answers' prefix concentration (collector.query.prefixes' definition)."""
    by_group: Dict[int, Counter] = defaultdict(Counter)
    for group, replica in answered:
        by_group[group][replica] += 1
    return concentration(Share.of(by_replica) for by_replica in by_group.values())
