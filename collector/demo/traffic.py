"""The demo's traffic: open-loop arrivals (Poisson) to every app, half through
Serve's HTTP proxy and half through deployment handles in this process, so
that both kinds of router (the proxy's and the driver's) have decisions to
show; plus periodic bursts at `backend`, larger than its replicas can take,
which make them reject requests and make FIFO hand replicas between requests.

Open loop: arrivals do not wait for answers, as with real clients; a cap on
requests in flight per app keeps a stalled app from piling up work, and the
requests it turns away are counted.

The `llm` app is sent chat requests through handles only (its router reads
the prompt from the request object, which HTTP does not carry): each a
shared system prompt, the popular ones more often, and a question of its own.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, fields
from typing import Dict, Optional

import aiohttp

from .apps import APPS, MODELS, SYSTEM_PROMPTS, ChatRequest, chat_request

SHARES = {"uniform": 0.2, "throughput": 0.2, "backend": 0.2, "models": 0.3, "llm": 0.1}  # of --rate
PATHS = {app.name: ("http", "handle") if app.http else ("handle",) for app in APPS}
MODEL_WEIGHTS = [1 / (i + 1) for i in range(len(MODELS))]  # Zipf: a few hot models, a long tail
SYSTEM_PROMPT_WEIGHTS = [1 / (i + 1) for i in range(len(SYSTEM_PROMPTS))]  # Zipf, as models
BURST_EVERY_S = 15.0
BURST_REQUESTS = 40
MAX_IN_FLIGHT = 100  # per app
TIMEOUT_S = 30.0


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: int = 0


class Traffic:
    def __init__(self, handles: Dict[str, object], http_url: str, rate: float, seed: Optional[int] = None):
        self.handles = handles
        self.http_url = http_url
        self.rate = rate
        self.tally = {app: Tally() for app in SHARES}
        self._random = random.Random(seed)
        self._in_flight: Dict[str, int] = {app: 0 for app in SHARES}
        self._tasks: set = set()

    @property
    def total(self) -> Tally:
        return Tally(*(sum(getattr(t, f.name) for t in self.tally.values()) for f in fields(Tally)))

    async def run(self) -> None:
        """Send until cancelled; then wait a little for the answers in flight."""
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as self._http:
            streams = [asyncio.create_task(self._arrivals(app, path, share * self.rate / len(PATHS[app])))
                       for app, share in SHARES.items() for path in PATHS[app]]
            streams.append(asyncio.create_task(self._bursts("backend")))
            try:
                await asyncio.gather(*streams)
            finally:
                for stream in streams:
                    stream.cancel()
                if self._tasks:
                    await asyncio.wait(self._tasks, timeout=10)
                for task in self._tasks:
                    task.cancel()

    async def _arrivals(self, app: str, path: str, rate: float) -> None:
        while True:
            await asyncio.sleep(self._random.expovariate(rate))
            self._start(app, path)

    async def _bursts(self, app: str) -> None:
        while True:
            await asyncio.sleep(BURST_EVERY_S)
            for _ in range(BURST_REQUESTS):
                self._start(app, "handle", capped=False)

    def _start(self, app: str, path: str, capped: bool = True) -> None:
        if capped and self._in_flight[app] >= MAX_IN_FLIGHT:  # not sent, not counted
            return
        model = self._random.choices(MODELS, MODEL_WEIGHTS)[0] if app == "models" else None
        prompt = None
        if app == "llm":
            system_prompt = self._random.choices(SYSTEM_PROMPTS, SYSTEM_PROMPT_WEIGHTS)[0]
            prompt = chat_request(system_prompt, f"Question {self._random.randrange(10**6)}: what should I do next?")
        task = asyncio.create_task(self._request(app, path, model, prompt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, app: str, path: str, model: Optional[str], prompt: Optional[ChatRequest]) -> None:
        tally = self.tally[app]
        tally.sent += 1
        self._in_flight[app] += 1
        try:
            if path == "http":
                headers = {"serve_multiplexed_model_id": model} if model else {}
                async with self._http.get(f"{self.http_url}/{app}", headers=headers) as response:
                    await response.read()
                    response.raise_for_status()
            else:
                handle = self.handles[app]
                if model:
                    handle = handle.options(multiplexed_model_id=model)
                await asyncio.wait_for(handle.remote() if prompt is None else handle.remote(prompt), TIMEOUT_S)
            tally.ok += 1
        except asyncio.CancelledError:
            raise
        except Exception:  # an error answer or a timeout: counted, shown, never fatal to the demo
            tally.failed += 1
        finally:
            self._in_flight[app] -= 1
