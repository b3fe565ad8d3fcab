"""schemathesis against a live ``interlock serve``, driven by the official OpenAI OpenAPI spec
trimmed to what interlock serves (tests/fuzz/openai-openapi.yaml; tests/fuzz/README.md).

Both generation modes, bounded and derandomized: valid requests by the spec and invalid ones.
Every answer must be a documented status with an OpenAI-style body where it is an error, never
a 5xx, none may hang (each call has a timeout), and nothing may stay in flight afterwards.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    status_code_conformance,
)

SPEC = Path(__file__).parent / "fuzz" / "openai-openapi.yaml"
#: Examples per operation and mode (six runs: about 25 s in all).
EXAMPLES = 20


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A real ``interlock serve`` (mock workers, no simulated time); yields its /v1 URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "interlock", "serve", "--port", "0", "--zero-time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = None
        for line in process.stdout:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url is not None, (
            f"serve did not start: {process.stderr.read() if process.stderr else ''}"
        )
        yield url + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """Each operation in both modes; negative only where there is something to get wrong."""
    schema = schemathesis.openapi.from_path(SPEC)
    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        cases.append((op.method.upper(), op.path, GenerationMode.POSITIVE))
        if op.body:
            cases.append((op.method.upper(), op.path, GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_the_api_never_answers_5xx_or_undocumented(
    server: str, method: str, path: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_path(SPEC)
    schema.config.update(base_url=server)
    operation = schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(timeout=30)
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance],
        )
        if response.status_code >= 400 and path != "/models/{model}":
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error

    run()
    # Nothing left in flight: every request the fuzzer sent has ended on the server.
    metrics = httpx.get(server.removesuffix("/v1") + "/metrics", timeout=30).text
    assert "interlock_http_requests_in_flight 0.0" in metrics
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=30).json()["in_flight"] == 0
