"""The mock's vLLM surface (``interlock worker --openai-port``) answers in the shapes a real
vLLM 0.32 answers in: the same requests go to a tier engine and to the mock, and the JSON
skeletons (keys and value kinds, recursively), the stream's chunk layout, the error bodies,
the metric names with their label names, and the KV events' keys must agree, apart from the
differences docs/mock-vllm.md lists.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import zmq
from engine_tier import BLOCK_SIZE, MAX_MODEL_LEN, SERVED_MODEL_NAME, EngineTier
from prometheus_client.parser import text_string_to_metric_families

from interlock.wire import decode_kv_batch, parse_replay_reply, replay_request_frames

TIMEOUT = 60.0


def skeleton(value: Any) -> Any:
    """``value``'s shape: dict keys with their values' shapes, a list's first element's shape,
    and the kind of a scalar (ints and floats are both numbers)."""
    if isinstance(value, dict):
        return {key: skeleton(item) for key, item in value.items()}
    if isinstance(value, list):
        return [skeleton(value[0])] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def differences(vllm: Any, mock: Any, where: str = "") -> list[str]:
    """Where the mock's shape differs from vLLM's (a null on one side matches anything)."""
    if vllm == "null" or mock == "null":
        return []
    if isinstance(vllm, dict) and isinstance(mock, dict):
        found = [f"{where}.{k}: vLLM has it, the mock not" for k in vllm if k not in mock]
        found += [f"{where}.{k}: the mock has it, vLLM not" for k in mock if k not in vllm]
        for key in vllm.keys() & mock.keys():
            found += differences(vllm[key], mock[key], f"{where}.{key}")
        return found
    if isinstance(vllm, list) and isinstance(mock, list):
        if vllm and mock:
            return differences(vllm[0], mock[0], f"{where}[0]")
        return []
    return [] if vllm == mock else [f"{where}: vLLM {vllm}, the mock {mock}"]


@pytest.fixture(scope="module")
def mock_url(_engine_tier_session: EngineTier) -> Iterator[str]:
    """An ``interlock worker --openai-port`` dressed as the tier's engines (tokenizer, block
    size, context, model name), healthy."""
    engine_tier = _engine_tier_session
    port = engine_tier.ports.pick()
    process = engine_tier.spawn_interlock(
        "worker",
        "--id", "77",
        "--openai-port", str(port),
        "--tokenizer", str(engine_tier.model_dir),
        "--block-size", str(BLOCK_SIZE),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--served-model-name", SERVED_MODEL_NAME,
        "--zero-time",
        name="mock-vllm",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not process.running:
            raise AssertionError(f"the mock did not come up:\n{process.log_tail()}")
        time.sleep(0.2)
    yield url
    process.stop()


def _prompt(seed: int, length: int = 70) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(1000, 150000) for _ in range(length)]


def _both(engine_tier: EngineTier, mock_url: str) -> list[str]:
    return [engine_tier.engine(2).base_url, mock_url]


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=TIMEOUT)


def _stream(url: str, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[str]]:
    with httpx.stream("POST", url + path, json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        return response.headers, [
            line[6:] for line in response.iter_lines() if line.startswith("data: ")
        ]


def _compare(vllm: Any, mock: Any) -> None:
    found = differences(skeleton(vllm), skeleton(mock))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("return_token_ids", [True, False])
def test_a_completion_has_vllms_shape(
    engine_tier: EngineTier, mock_url: str, return_token_ids: bool
) -> None:
    body = {
        "model": SERVED_MODEL_NAME,
        "prompt": _prompt(11),
        "max_tokens": 4,
        "ignore_eos": True,
        "return_token_ids": return_token_ids,
    }
    vllm, mock = (_post(url, "/v1/completions", body) for url in _both(engine_tier, mock_url))
    assert vllm.status_code == mock.status_code == 200
    assert vllm.headers["content-type"] == mock.headers["content-type"]
    _compare(vllm.json(), mock.json())


def test_a_completion_stream_has_vllms_chunks(engine_tier: EngineTier, mock_url: str) -> None:
    body = {
        "model": SERVED_MODEL_NAME,
        "prompt": _prompt(12),
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    (v_head, vllm), (m_head, mock) = (
        _stream(url, "/v1/completions", body) for url in _both(engine_tier, mock_url)
    )
    assert v_head["content-type"] == m_head["content-type"]
    assert vllm[-1] == mock[-1] == "[DONE]"
    assert len(vllm) == len(mock) == 4 + 2  # a chunk per token, the usage chunk, [DONE]
    for v_chunk, m_chunk in zip(vllm[:-1], mock[:-1], strict=True):
        _compare(json.loads(v_chunk), json.loads(m_chunk))


def test_a_chat_completion_has_vllms_shape(engine_tier: EngineTier, mock_url: str) -> None:
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 4,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    vllm, mock = (_post(url, "/v1/chat/completions", body) for url in _both(engine_tier, mock_url))
    assert vllm.status_code == mock.status_code == 200
    _compare(vllm.json(), mock.json())
    assert vllm.json()["prompt_token_ids"] == mock.json()["prompt_token_ids"]


def test_a_chat_stream_has_vllms_chunks(engine_tier: EngineTier, mock_url: str) -> None:
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    (_, vllm), (_, mock) = (
        _stream(url, "/v1/chat/completions", body) for url in _both(engine_tier, mock_url)
    )
    assert vllm[-1] == mock[-1] == "[DONE]"
    assert len(vllm) == len(mock), (vllm, mock)
    for v_chunk, m_chunk in zip(vllm[:-1], mock[:-1], strict=True):
        _compare(json.loads(v_chunk), json.loads(m_chunk))


def test_tokenize_and_models_agree(engine_tier: EngineTier, mock_url: str) -> None:
    vllm, mock = (
        _post(url, "/tokenize", {"prompt": "Hello there", "add_special_tokens": True}).json()
        for url in _both(engine_tier, mock_url)
    )
    assert vllm == mock
    v_models, m_models = (
        httpx.get(url + "/v1/models", timeout=TIMEOUT).json()
        for url in _both(engine_tier, mock_url)
    )
    assert v_models["data"][0]["id"] == m_models["data"][0]["id"] == SERVED_MODEL_NAME
    assert v_models["data"][0]["max_model_len"] == m_models["data"][0]["max_model_len"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": SERVED_MODEL_NAME, "prompt": [1, 2], "max_tokens": 5000}, 400),
        ({"model": "not-served", "prompt": [1, 2]}, 404),
        (
            {
                "model": SERVED_MODEL_NAME,
                "prompt": [1, 2],
                "stream_options": {"include_usage": True},
            },
            400,
        ),
        ({"model": SERVED_MODEL_NAME, "prompt": [1, 10_000_000]}, 400),
        ({"model": SERVED_MODEL_NAME, "prompt": []}, 400),
        ({"model": SERVED_MODEL_NAME, "prompt": [1, 2], "min_tokens": 9, "max_tokens": 2}, 400),
    ],
)
def test_errors_have_vllms_status_and_body(
    engine_tier: EngineTier, mock_url: str, body: dict[str, Any], status: int
) -> None:
    vllm, mock = (_post(url, "/v1/completions", body) for url in _both(engine_tier, mock_url))
    assert vllm.status_code == mock.status_code == status, (vllm.text, mock.text)
    assert vllm.json() == mock.json()
    _compare(vllm.json(), mock.json())


def test_the_mocks_metrics_are_vllms_names_and_labels(
    engine_tier: EngineTier, mock_url: str
) -> None:
    def labels(url: str) -> dict[str, frozenset[str]]:
        text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
        found: dict[str, frozenset[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("vllm:") and not sample.name.endswith("_created"):
                    found[sample.name] = found.get(sample.name, frozenset()) | frozenset(
                        sample.labels
                    )
        return found

    vllm, mock = (labels(url) for url in _both(engine_tier, mock_url))
    assert mock.keys() <= vllm.keys(), sorted(mock.keys() - vllm.keys())
    for name, names in mock.items():
        assert names <= vllm[name], (name, sorted(names - vllm[name]))
    assert mock["vllm:cache_config_info"] >= {"block_size", "num_gpu_blocks"}


def test_a_stored_block_event_has_vllms_keys(engine_tier: EngineTier) -> None:
    """The mock's BlockStored carries the fields a replay from the real engine shows."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    engine = engine_tier.engine(2)
    _post(
        engine.base_url,
        "/v1/completions",
        {"model": SERVED_MODEL_NAME, "prompt": _prompt(13), "max_tokens": 1},
    )
    try:
        dealer.connect(engine.replay_endpoint)
        dealer.send_multipart(replay_request_frames(0))
        stored = None
        while (reply := parse_replay_reply(dealer.recv_multipart())) is not None:
            for event in decode_kv_batch(reply.payload).events:
                if type(event).__name__ == "VllmBlockStored":
                    stored = event
    finally:
        dealer.close(linger=0)
        context.term()
    assert stored is not None
    # What the mock's publisher sets (interlock/engines/mock/_kv_publisher.py).
    assert stored.medium == "GPU" and stored.group_idx == 0 and stored.lora_id is None
    assert stored.kv_cache_spec_kind == "full_attention" and stored.block_size == BLOCK_SIZE
    assert stored.extra_keys == (None,) * len(stored.block_hashes)
