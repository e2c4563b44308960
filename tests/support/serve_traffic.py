"""Traffic for the Ray Serve integration tests: through Serve's HTTP proxy and through a handle."""

from __future__ import annotations

import asyncio

import httpx


def send_http(url: str, n: int, concurrency: int) -> None:
    async def run():
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for start in range(0, n, concurrency):
                responses = await asyncio.gather(
                    *(client.get(url) for _ in range(min(concurrency, n - start)))
                )
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]

    asyncio.run(run())


def send_handle(handle, n: int, concurrency: int) -> None:
    for start in range(0, n, concurrency):
        responses = [handle.remote() for _ in range(min(concurrency, n - start))]
        for response in responses:
            response.result(timeout_s=60)
