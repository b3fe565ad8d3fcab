"""Overload over HTTP, against a real ``interlock serve`` process: past the workers' in-flight
limits and the queue, a request is answered 429 with ``Retry-After`` and an OpenAI-style body
(the official client raises RateLimitError), the admitted ones complete, and nothing is left
queued or in flight once the load stops.

The behaviour (who waits, in which order, who is shed) is tested in virtual time in
tests/test_admission.py; this checks the contract flags and the wire.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import trio
from helpers import wait_until
from test_http_cli import _command

TIMEOUT = 60.0


@asynccontextmanager
async def serving(*flags: str) -> AsyncIterator[str]:
    """``interlock serve --port 0 FLAGS`` until the block ends; yields its URL."""
    process = await trio.lowlevel.open_process(
        [*_command(), "serve", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        text = b""
        with trio.fail_after(TIMEOUT):
            while b"listening on " not in text or not text.endswith(b"\n"):
                chunk = await process.stdout.receive_some(65536)
                assert chunk, f"serve exited early:\n{text.decode()}"
                text += chunk
        yield re.search(rb"listening on (\S+)", text).group(1).decode()  # type: ignore[union-attr]
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def body(index: int) -> dict[str, Any]:
    return {
        "model": "mock",
        "prompt": f"request {index}: tell me a long story",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }


async def test_past_the_limits_requests_get_429_with_retry_after_and_the_rest_complete() -> None:
    # One worker with one slot and a queue of one, slow enough that the first streams are
    # still running when the others arrive.
    flags = ["--workers", "1", "--speedup", "1", "--max-inflight-per-worker", "1"]
    async with serving(*flags, "--max-queued-requests", "1") as url:
        statuses: dict[int, int] = {}
        refusals: list[httpx.Response] = []
        done: list[int] = []
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            first_token = trio.Event()

            async def one(index: int) -> None:
                async with http.stream("POST", "/v1/completions", json=body(index)) as answer:
                    statuses[index] = answer.status_code
                    if answer.status_code != 200:
                        await answer.aread()
                        refusals.append(answer)
                        return
                    async for line in answer.aiter_lines():
                        if line.startswith("data: {"):
                            first_token.set()
                        if line == "data: [DONE]":
                            done.append(index)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                await first_token.wait()  # request 0 holds the slot
                for index in range(1, 6):
                    nursery.start_soon(one, index)
                # Request 1..5 arrive: one waits for the slot, four are refused at once.
                await wait_until(lambda: len(refusals) == 4, within=TIMEOUT)

                # The official client sees the same answer as a RateLimitError.
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                try:
                    await client.completions.create(model="mock", prompt="one more", max_tokens=5)
                except openai.RateLimitError as error:
                    assert error.status_code == 429
                    assert error.code == "overloaded"
                else:
                    raise AssertionError("a request past the queue was not refused")
                finally:
                    await client.close()

            assert sorted(statuses.values()) == [200, 200, 429, 429, 429, 429]
            assert sorted(done) == sorted(i for i, s in statuses.items() if s == 200)
            for refusal in refusals:
                assert refusal.headers["retry-after"].isdigit()
                error = refusal.json()["error"]
                assert error["code"] == "overloaded"
                assert "max_queued_requests=1" in error["message"]
            health = (await http.get("/health")).json()
            assert health["queued"] == 0 and health["in_flight"] == 0
            metrics = (await http.get("/metrics")).text
    assert re.search(r"^interlock_requests_shed_total 5\.0$", metrics, re.M), metrics
    assert re.search(r"^interlock_requests_queued 0\.0$", metrics, re.M), metrics
