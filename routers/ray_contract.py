"""Ray's private contract: everything of Ray's that routelens relies on and
Ray does not make public, in one place.

Ray 2.60 gives a request router no way to learn which ranking supplied a
replica handed over by FIFOMixin, what a request's result was, or which
sends skipped the rejection protocol. The tracer learns them by overriding
two private RequestRouter methods and by reading the frames of Ray's own
functions that call its hooks. Everything it reads that way is declared
here, once, with its feature detection: a function that is missing, or no
longer has the parameters, locals or calls relied on, switches its feature
off when this module is imported (the fallbacks are in docs/design.md,
"Ray's private contract", whose table lists the same items).
`tests/test_ray_contract.py` checks every item against the installed Ray
and fails naming the Ray function that changed, so an upgrade of the pin
is caught by the suite, not by missing figures.

The hooks compare a caller's code object with the ones below (`is`, one
pointer comparison per hook on the hot path), then read its locals through
the small readers at the end of this module.
"""

from __future__ import annotations

import dataclasses
import dis
import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from ray.serve.request_router import FIFOMixin, RequestRouter

try:
    from ray.serve._private.router import AsyncioRouter
except ImportError:  # private: another Ray may not have it
    AsyncioRouter = None


@dataclasses.dataclass(frozen=True)
class PrivateFunction:
    """One private function of Ray's that routelens overrides, calls or
    whose frame it reads, and what it relies on in it."""

    owner: Any  # the class, or None when Ray does not have it
    qualname: str  # "AsyncioRouter._process_finished_request"
    # The parameters an override of ours takes (overridden functions only), in order.
    parameters: Tuple[str, ...] = ()
    # Locals read from its frame while it calls one of the router's hooks.
    frame_locals: Tuple[str, ...] = ()
    # Names its code must use: the hook whose caller it is, a method it must call.
    uses: Tuple[str, ...] = ()
    # Keyword arguments it must pass in a call (the router's constructor kwargs).
    passes_keywords: Tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.qualname.rpartition(".")[2]

    @property
    def function(self) -> Any:
        value = self.owner.__dict__.get(self.name) if self.owner is not None else None
        if value is None and self.owner is not None:
            value = getattr(self.owner, self.name, None)
        return value.fget if isinstance(value, property) else value

    @property
    def code(self) -> Any:
        return getattr(self.function, "__code__", None)

    def problems(self) -> List[str]:
        """What the installed Ray no longer provides, each naming this
        function; empty when everything relied on is there."""
        code = self.code
        if code is None:
            return [f"Ray has no {self.qualname} (routelens relies on it)"]
        found = []
        if self.parameters and not _overridable(self.function, self.parameters):
            taken = ", ".join(p for p in inspect.signature(self.function).parameters if p != "self")
            found.append(f"{self.qualname} takes ({taken}); routelens overrides it as"
                         f" ({', '.join(self.parameters)})")
        missing = [n for n in self.frame_locals if n not in code.co_varnames + code.co_cellvars]
        if missing:
            found.append(f"{self.qualname} has no local {', '.join(missing)} (routelens reads it from its frame)")
        missing = [n for n in self.uses if n not in code.co_names]
        if missing:
            found.append(f"{self.qualname} no longer uses {', '.join(missing)}")
        if self.passes_keywords:
            passed = {k for const in code.co_consts if isinstance(const, tuple) for k in const if isinstance(k, str)}
            missing = [k for k in self.passes_keywords if k not in passed]
            if missing:
                found.append(f"{self.qualname} no longer passes {', '.join(missing)}")
        return found

    def holds(self) -> bool:
        return not self.problems()


@dataclasses.dataclass(frozen=True)
class PrivateAttributes:
    """Private attributes (or dataclass fields) of one of Ray's classes that
    routelens reads, on objects Ray hands it."""

    owner: Any
    qualname: str
    names: Tuple[str, ...]

    def problems(self) -> List[str]:
        if self.owner is None:
            return [f"Ray has no {self.qualname} (routelens reads {', '.join(self.names)})"]
        if dataclasses.is_dataclass(self.owner):
            present = {f.name for f in dataclasses.fields(self.owner)}
        else:  # attributes set by __init__: look for `self.<name> =` in it
            present = set(dir(self.owner)) | _assigned_self_attributes(self.owner.__init__)
        missing = [n for n in self.names if n not in present]
        return [f"{self.qualname} has no {', '.join(missing)} (routelens reads it)"] if missing else []

    def holds(self) -> bool:
        return not self.problems()


def _overridable(function: Any, parameters: Tuple[str, ...]) -> bool:
    """Whether an override taking `parameters` (after self) can stand in for
    `function`: the same leading positional parameters, none other required."""
    try:
        signature = list(inspect.signature(function).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in signature if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (tuple(p.name for p in positional[:len(parameters)]) == parameters
            and all(p.default is not p.empty for p in positional[len(parameters):])
            and not any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in signature))


def _assigned_self_attributes(function: Any) -> FrozenSet[str]:
    code = getattr(function, "__code__", None)
    if code is None:
        return frozenset()
    instructions = list(dis.get_instructions(code))
    return frozenset(ins.argval for prev, ins in zip(instructions, instructions[1:])
                     if ins.opname == "STORE_ATTR" and prev.opname == "LOAD_FAST" and prev.argval == "self")


def self_attributes(code: Any) -> FrozenSet[str]:
    """Attributes a function's code reads or calls on `self`, in nested
    functions (lambdas) too: what a stand-in for its class must provide."""
    names = set()
    instructions = list(dis.get_instructions(code))
    for prev, ins in zip(instructions, instructions[1:]):
        if (prev.opname in ("LOAD_FAST", "LOAD_DEREF") and prev.argval == "self"
                and ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR")):
            names.add(ins.argval)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= self_attributes(const)
    return frozenset(names)


def _private(module: str, name: str) -> Any:
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


# -- exact attribution of FIFO hand-offs (routers.attribution) ---------------
# The mixin overrides the fulfilment to learn which replica a routing task
# found, and _record_queue_wait_time, which Ray calls with the request that
# receives it (FIFOMixin's fulfilment, used by the default pow-2 router, and
# RequestRouter's own).
FULFIL = PrivateFunction(RequestRouter, "RequestRouter._fulfill_next_pending_request",
                         parameters=("replica", "request_metadata"), uses=("_record_queue_wait_time",))
FIFO_FULFIL = PrivateFunction(FIFOMixin, "FIFOMixin._fulfill_next_pending_request",
                              parameters=("replica", "request_metadata"), uses=("_record_queue_wait_time",))
RECORD_QUEUE_WAIT = PrivateFunction(RequestRouter, "RequestRouter._record_queue_wait_time",
                                    parameters=("pending_request",))

# -- results read from Ray's own done-callback (routers.completions) ---------
# Ray hands a result's value to the request router nowhere: only its own
# done-callback sees it, which then calls on_request_completed. Reading it
# from that caller's frame spares the tracer a done-callback of its own per
# request, which costs the process one more fetch and deserialization of
# every result: measured, most of the tracer's end-to-end cost through a handle.
PROCESS_FINISHED = PrivateFunction(AsyncioRouter, "AsyncioRouter._process_finished_request",
                                   frame_locals=("result",), uses=("on_request_completed",))

# -- refusals, as the replica answers (routers.completions) -----------------
# Ray's usual sender calls on_new_queue_len_info with each replica's answer
# to the rejection protocol, accepted or not, before it retries: the mixin
# reads the answer (`queue_info`) and the request (`pr`) from its frame, so a
# refusal is recorded when it happens, not guessed later from a completion
# that no accepted attempt claimed. ROUTE_AND_SEND and QUEUE_INFO, below.

# -- when a request was sent (routers.completions) ----------------------------
# Ray's usual sender calls on_send_request as it sends, and on_request_routed
# only once the replica's answer is back and the router's loop resumes the
# sender: a request's latency starts at the send (the time noted against
# the sender's frame, its request `pr` read from that frame with the
# answer), so that a router that holds its loop cannot shorten it.
# ROUTE_AND_SEND, below.

# -- sends that skip the rejection protocol (routers.unrouted_sends) ---------
# They never reach on_request_routed: DeploymentHandle.choose_replica()
# reserves a slot on the replica it routed to and dispatch() sends there;
# broadcast() sends to every replica without routing; inside Ray Client, and
# to Java replicas, Ray's usual sender sends without asking. The mixin learns
# of them from the hooks Ray calls on those paths (on_new_queue_len_info
# after a reservation and when an unused one is released, on_send_request
# after every send), by which of these functions is the caller.
ROUTE_AND_SEND = PrivateFunction(AsyncioRouter, "AsyncioRouter._route_and_send_request_once",
                                 frame_locals=("pr", "result", "with_rejection", "queue_info"),
                                 uses=("on_send_request", "on_new_queue_len_info"))
RESERVE = PrivateFunction(AsyncioRouter, "AsyncioRouter._pick_and_reserve_replica",
                          frame_locals=("pr", "queue_info"), uses=("on_new_queue_len_info",))
RELEASE = PrivateFunction(AsyncioRouter, "AsyncioRouter._release_slot_and_refresh_cache",
                          frame_locals=("selection",), uses=("on_new_queue_len_info",))
BROADCAST = PrivateFunction(AsyncioRouter, "AsyncioRouter.broadcast",
                            frame_locals=("replica_pr",), uses=("on_send_request",))
QUEUE_INFO = PrivateAttributes(_private("ray.serve._private.common", "ReplicaQueueLengthInfo"),
                               "ReplicaQueueLengthInfo", ("accepted",))
SELECTION = PrivateAttributes(
    _private("ray.serve._private.request_router.replica_wrapper", "ReplicaSelection"),
    "ReplicaSelection", ("_dispatched", "_request_metadata"))

# -- the router's queue-length cache (routers.decisions, routers.wire; routers.testing primes it) --
QUEUE_LEN_CACHE = PrivateAttributes(
    _private("ray.serve._private.request_router.common", "ReplicaQueueLengthCache"),
    "ReplicaQueueLengthCache", ("_cache",))
QUEUE_LEN_ENTRY = PrivateAttributes(
    _private("ray.serve._private.request_router.common", "ReplicaQueueLengthCacheEntry"),
    "ReplicaQueueLengthCacheEntry", ("queue_len", "timestamp"))

# -- what Ray tells a router when it builds it (routers.tracer) --------------
# The keyword arguments Ray passes to the router's constructor that the
# tracer reads: its identity, and whether sends ask the replica first (Ray
# routes without the queue-length cache only inside Ray Client, where it
# sends without the rejection protocol).
ROUTER_KWARGS = ("deployment_id", "handle_source", "self_node_id", "self_actor_id", "use_replica_queue_len_cache")
BUILD_ROUTER = PrivateFunction(AsyncioRouter, "AsyncioRouter.request_router", passes_keywords=ROUTER_KWARGS)

# -- what routers.testing borrows to run a router without a cluster ----------
# RayRouter runs these functions of AsyncioRouter itself, on a stand-in that
# provides the attributes they read (checked against self_attributes()).
TESTING_BORROWS = tuple(
    PrivateFunction(AsyncioRouter, f"AsyncioRouter.{name}")
    for name in ("_process_finished_request", "_get_actor_died_error", "_route_and_send_request_once",
                 "_register_completion_callback", "_register_decrement_queue_len_cache_callback"))
# Private modules imported by routelens (module, name, the routelens module that imports it).
PRIVATE_IMPORTS = (
    ("ray.serve._private.router", "AsyncioRouter", "routers.ray_contract, routers.testing"),
    ("ray.serve._private.request_router.pow_2_router", "PowerOfTwoChoicesRequestRouter", "routers.examples"),
    ("ray.serve._private.common", "DeploymentHandleSource", "routers.testing"),
    ("ray.serve._private.common", "DeploymentID", "routers.testing"),
    ("ray.serve._private.common", "ReplicaID", "routers.testing"),
    ("ray.serve._private.common", "ReplicaQueueLengthInfo", "routers.testing"),
    ("ray.serve._private.common", "RequestMetadata", "routers.testing"),
    ("ray.serve._private.request_router.common", "ReplicaQueueLengthCacheEntry", "routers.testing"),
)

# Everything above that the tracer itself reads: the table in docs/design.md.
TRACER_CONTRACT = (FULFIL, FIFO_FULFIL, RECORD_QUEUE_WAIT, PROCESS_FINISHED, ROUTE_AND_SEND, RESERVE, RELEASE,
                   BROADCAST, QUEUE_INFO, SELECTION, QUEUE_LEN_CACHE, QUEUE_LEN_ENTRY, BUILD_ROUTER)

# -- feature detection, once, at import ---------------------------------------
EXACT_ATTRIBUTION = FULFIL.holds() and FIFO_FULFIL.holds() and RECORD_QUEUE_WAIT.holds()
RESULTS_FROM_RAY = EXACT_ATTRIBUTION and PROCESS_FINISHED.holds()
# The replica's answer read from Ray's usual sender: refusals, and when an accepted request was sent (its
# latency starts there), noted as the sender calls on_send_request and matched to its request with the answer.
REFUSALS = ROUTE_AND_SEND.holds() and QUEUE_INFO.holds()
UNROUTED_SENDS = all(item.holds() for item in (ROUTE_AND_SEND, RESERVE, RELEASE, BROADCAST, QUEUE_INFO, SELECTION))

# The callers' code objects, for the hooks' `is` tests (None when missing).
FINISHED_CODE = PROCESS_FINISHED.code
ROUTE_AND_SEND_CODE = ROUTE_AND_SEND.code
RESERVE_CODE = RESERVE.code
RELEASE_CODE = RELEASE.code
BROADCAST_CODE = BROADCAST.code
RESULT_LOCAL = "result"  # PROCESS_FINISHED's local holding the result


def ray_frame(frame: Any, code: Any) -> Any:
    """The frame running Ray's function `code` among the callers above a hook,
    else None. Three frames: subclasses' overrides of the hook (one or two)
    may sit between Ray and the mixin."""
    for _ in range(3):
        if frame is None or frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


# -- readers of Ray's frames and objects --

def reservation(frame: Any) -> Tuple[Any, bool]:
    """In RESERVE's frame: (the request, whether the replica accepted the slot)."""
    ray_locals = frame.f_locals
    return ray_locals["pr"], ray_locals["queue_info"].accepted


def released_reservation(frame: Any) -> Tuple[Any, bool]:
    """In RELEASE's frame: (the reserved request's metadata, whether it was dispatched)."""
    selection = frame.f_locals["selection"]
    return selection._request_metadata, selection._dispatched


def answer(frame: Any) -> Tuple[Any, bool]:
    """In ROUTE_AND_SEND's frame, as it calls on_new_queue_len_info: (the
    request, whether the replica accepted it). The hot path: once per attempt."""
    ray_locals = frame.f_locals
    return ray_locals["pr"], ray_locals["queue_info"].accepted


def send(frame: Any) -> Tuple[Any, Any, bool]:
    """In ROUTE_AND_SEND's frame: (the request, its result, whether the replica was asked first)."""
    ray_locals = frame.f_locals
    return ray_locals["pr"], ray_locals["result"], ray_locals["with_rejection"]


def broadcast_request(frame: Any) -> Any:
    """In BROADCAST's frame: the request sent to the replica."""
    return frame.f_locals["replica_pr"]


def queue_len_cache(router: Any) -> Optional[Dict[Any, Any]]:
    """The dict of the router's queue-length cache (ReplicaID -> entry with
    queue_len and timestamp; Ray replaces an entry, never changes it), or
    None without one. Ray never replaces the dict, so methods bound to it
    stay valid."""
    cache = getattr(getattr(router, "replica_queue_len_cache", None), "_cache", None)
    return cache if isinstance(cache, dict) else None


def contract_problems() -> Dict[str, List[str]]:
    """Every item routelens relies on that the installed Ray breaks, by item."""
    items = TRACER_CONTRACT + TESTING_BORROWS
    return {item.qualname: item.problems() for item in items if item.problems()}
