"""Ray's private contract (routers.ray_contract) against the installed Ray.

Each failure names the Ray function or class that changed and what
routelens relied on in it: the place to look when upgrading Ray."""

from __future__ import annotations

import asyncio
import importlib
import re
from pathlib import Path

import pytest

from routelens.routers import ray_contract
from routelens.routers.examples import UniformRequestRouter
from routelens.routers.ray_contract import PrivateAttributes, PrivateFunction
from routelens.routers.testing import RayRouter, make_router

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


@pytest.mark.parametrize("item", ray_contract.TRACER_CONTRACT, ids=lambda item: item.qualname)
def test_what_the_tracer_reads_is_still_there(item):
    problems = item.problems()
    assert not problems, "Ray changed what the tracer relies on:\n" + "\n".join(problems)


def test_every_feature_is_on_under_the_pinned_ray():
    """With the pinned Ray nothing falls back: exact attribution, results
    from Ray's done-callback, sends that skip the rejection protocol."""
    assert ray_contract.EXACT_ATTRIBUTION and ray_contract.RESULTS_FROM_RAY and ray_contract.UNROUTED_SENDS


@pytest.mark.parametrize("module, name, user", ray_contract.PRIVATE_IMPORTS, ids=lambda v: str(v))
def test_private_imports_still_resolve(module, name, user):
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{module}.{name}, imported by {user}, is gone: {exc}")
    assert found is not None


@pytest.mark.parametrize("item", ray_contract.TESTING_BORROWS, ids=lambda item: item.qualname)
def test_what_the_testing_harness_borrows_finds_what_it_reads(item):
    """routers.testing.RayRouter runs these functions of Ray's AsyncioRouter on
    itself: every attribute they read on `self` must be one it provides."""
    assert item.code is not None, f"Ray has no {item.qualname} (routers.testing borrows it)"

    async def stand_in():
        return RayRouter(make_router(UniformRequestRouter, 1))

    provided = set(dir(RayRouter)) | set(vars(asyncio.run(stand_in()))) | RayRouter.LEFT_OUT
    missing = sorted(ray_contract.self_attributes(item.code) - provided)
    assert not missing, f"{item.qualname} now reads self.{', self.'.join(missing)}, which RayRouter lacks"


# -- the checks themselves catch the changes they are for ---------------------

class ChangedRay:
    """What a Ray upgrade could look like."""

    def _process_finished_request(self, replica_id, internal_request_id, outcome):
        return outcome  # the result is now called `outcome`, and on_request_completed is not called

    def _fulfill_next_pending_request(self, replica, request_metadata, priority):  # a new required parameter
        pass

    def __init__(self):
        self.renamed = {}


def test_a_changed_function_is_reported_by_name():
    finished = PrivateFunction(ChangedRay, "AsyncioRouter._process_finished_request", frame_locals=("result",),
                               uses=("on_request_completed",))
    assert finished.problems() == [
        "AsyncioRouter._process_finished_request has no local result (routelens reads it from its frame)",
        "AsyncioRouter._process_finished_request no longer uses on_request_completed",
    ]
    fulfil = PrivateFunction(ChangedRay, "RequestRouter._fulfill_next_pending_request",
                             parameters=("replica", "request_metadata"))
    assert fulfil.problems() == ["RequestRouter._fulfill_next_pending_request takes (replica, request_metadata,"
                                 " priority); routelens overrides it as (replica, request_metadata)"]
    gone = PrivateFunction(ChangedRay, "AsyncioRouter.broadcast", frame_locals=("replica_pr",))
    assert gone.problems() == ["Ray has no AsyncioRouter.broadcast (routelens relies on it)"]
    cache = PrivateAttributes(ChangedRay, "ReplicaQueueLengthCache", ("_cache",))
    assert cache.problems() == ["ReplicaQueueLengthCache has no _cache (routelens reads it)"]


def test_the_design_doc_lists_the_contract():
    """docs/design.md's table "Ray's private contract" names every item the tracer reads."""
    text = DESIGN.read_text()
    section = text[text.index("### Ray's private contract"):]
    section = section[:section.index("\n## ")]
    named = set(re.findall(r"`([A-Za-z_.]+)`", section))
    missing = []
    for item in ray_contract.TRACER_CONTRACT:
        spellings = ([f"{item.qualname}.{name}" for name in item.names] if isinstance(item, PrivateAttributes)
                     else [item.qualname])
        missing += [spelling for spelling in spellings if spelling not in named]
    assert not missing, f"docs/design.md, Ray's private contract, does not list {missing}"
