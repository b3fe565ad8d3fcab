"""API keys and trusted callers: ``interlock serve --api-key`` and friends.

The contract (401 with an OpenAI-style body without the right bearer token) runs against real
``interlock serve`` / ``interlock route`` processes, with the official ``openai`` client and raw
httpx; the privileges of trusted keys run against the in-process served harness.
"""

from __future__ import annotations

import hmac
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from helpers import frontend_parser
from hypothesis import given
from hypothesis import strategies as st
from test_http_cli import _command
from test_http_harness import serving

from interlock import ConfigError, PipelineConfig
from interlock.http import ApiKeys
from interlock.http._auth import exposure_warning
from interlock.http._cli import resolve_api_keys

KEY = "sk-interlock-test-1"
OTHER_KEY = "sk-interlock-test-2"
TRUSTED_KEY = "sk-interlock-gateway"
CHAT: dict[str, Any] = {
    "model": "mock",
    "messages": [{"role": "user", "content": "Hello!"}],
    "max_tokens": 4,
}


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- real processes ------------------------------------------------------------------------------


@attrs.frozen
class _Process:
    process: trio.Process
    url: str
    banner: list[str]

    async def stderr(self) -> str:
        """Everything the process wrote to stderr so far (waits for its first write)."""
        assert self.process.stderr is not None
        return (await self.process.stderr.receive_some(65536)).decode()


@asynccontextmanager
async def _serving_process(
    *argv: str, env: dict[str, str] | None = None
) -> AsyncIterator[_Process]:
    """``interlock <argv>`` (serve or route, listening on a free port) from its banner on;
    killed when the block ends."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INTERLOCK_", "OPENAI_"))}
    process = await trio.lowlevel.open_process(
        [*_command(), *argv, "--port", "0", "--zero-time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b"configuration:" not in buffer or not buffer.endswith(b"\n"):
                chunk = await process.stdout.receive_some(65536)
                assert chunk, f"{argv[0]} exited early: {buffer.decode()}"
                buffer += chunk
        lines = buffer.decode().splitlines()
        url = lines[0].split("listening on ")[1].split(" ")[0]
        # A server bound to 0.0.0.0 is reached on loopback.
        yield _Process(process, url.replace("0.0.0.0", "127.0.0.1"), lines)
    finally:
        process.kill()
        await process.wait()


def _openai_call(url: str, key: str, *, stream: bool) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        if stream:
            chunks = client.chat.completions.create(
                model="mock",
                messages=[{"role": "user", "content": "Hello!"}],
                max_tokens=4,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        completion = client.chat.completions.create(
            model="mock",
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=4,
            extra_body={"ignore_eos": True},
        )
        return completion.choices[0].message.content or ""


def _assert_unauthorized(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None and error["message"]


async def test_serve_with_api_keys_answers_401_without_the_right_bearer_token() -> None:
    async with (
        _serving_process("serve", "--api-key", KEY, "--api-key", OTHER_KEY) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        assert any("API keys     2 keys, 0 trusted (from --api-key)" in x for x in served.banner)
        for path in ("/v1/chat/completions", "/v1/completions"):
            body = CHAT if "chat" in path else {"model": "mock", "prompt": "hi", "max_tokens": 2}
            _assert_unauthorized(await client.post(path, json=body))
            _assert_unauthorized(await client.post(path, json=body, headers=_bearer("wrong")))
            _assert_unauthorized(
                await client.post(path, json=body, headers={"authorization": f"Basic {KEY}"})
            )
            # The key is case-sensitive; the scheme is not (RFC 6750).
            _assert_unauthorized(await client.post(path, json=body, headers=_bearer(KEY.upper())))
            right = await client.post(path, json=body, headers={"authorization": f"bearer {KEY}"})
            assert right.status_code == 200, right.text
        _assert_unauthorized(await client.get("/v1/models"))
        assert (await client.get("/v1/models", headers=_bearer(OTHER_KEY))).status_code == 200
        # Load balancers and Prometheus need no key.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/live")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "interlock_http_requests_total" in metrics.text

        def wrong_key() -> openai.AuthenticationError:
            with pytest.raises(openai.AuthenticationError) as caught:
                _openai_call(served.url, "sk-wrong", stream=False)
            return caught.value

        error = await trio.to_thread.run_sync(wrong_key)
        assert error.status_code == 401 and error.code == "invalid_api_key"
        for key in (KEY, OTHER_KEY):
            for stream in (False, True):
                text = await trio.to_thread.run_sync(
                    lambda k=key, s=stream: _openai_call(served.url, k, stream=s)
                )
                assert text, f"no text with key {key}, stream={stream}"

        def wrong_key_streaming() -> None:
            with pytest.raises(openai.AuthenticationError):
                _openai_call(served.url, "sk-wrong", stream=True)

        await trio.to_thread.run_sync(wrong_key_streaming)


async def test_keys_from_a_key_file_and_from_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# the team's keys\n\n  {KEY}  \n# {OTHER_KEY} (revoked)\n{TRUSTED_KEY}\n")
    key_file.chmod(0o600)
    # The flags win over INTERLOCK_API_KEY: the environment's key is not accepted.
    env = {"INTERLOCK_API_KEY": "sk-from-env"}
    async with (
        _serving_process("serve", "--api-key-file", str(key_file), env=env) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        assert any("2 keys, 0 trusted (from --api-key-file)" in line for line in served.banner)
        for key in (KEY, TRUSTED_KEY):
            answer = await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(key))
            assert answer.status_code == 200, answer.text
        for key in (OTHER_KEY, "sk-from-env", "# the team's keys"):
            _assert_unauthorized(
                await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(key))
            )
    env = {"INTERLOCK_API_KEY": f"{KEY}, {OTHER_KEY}", "INTERLOCK_TRUSTED_API_KEY": TRUSTED_KEY}
    async with (
        _serving_process("serve", env=env) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        for key in (KEY, OTHER_KEY, TRUSTED_KEY):
            answer = await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(key))
            assert answer.status_code == 200, answer.text
        _assert_unauthorized(await client.post("/v1/chat/completions", json=CHAT))
        pinned = {**CHAT, "nvext": {"annotations": ["query_instance_id"]}}
        ordinary = await client.post("/v1/chat/completions", json=pinned, headers=_bearer(KEY))
        assert ordinary.status_code == 403
        trusted = await client.post(
            "/v1/chat/completions", json=pinned, headers=_bearer(TRUSTED_KEY)
        )
        assert trusted.status_code == 200 and "token_ids" in trusted.json()["nvext"]


async def test_metrics_on_a_separate_address() -> None:
    async with (
        _serving_process("serve", "--api-key", KEY, "--metrics-port", "0") as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        line = next(line for line in served.banner if line.strip().startswith("metrics"))
        metrics_url = line.split()[1].removesuffix("/metrics")
        assert metrics_url != served.url and f"not on {served.url}" in line
        assert (
            await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(KEY))
        ).is_success
        # The main port no longer serves /metrics, even with a key; the metrics port needs none.
        _assert_unauthorized(await client.get("/metrics"))
        assert (await client.get("/metrics", headers=_bearer(KEY))).status_code == 404
        async with httpx.AsyncClient(base_url=metrics_url, timeout=30) as scraper:
            metrics = await scraper.get("/metrics")
            assert metrics.status_code == 200
            assert 'endpoint="/v1/chat/completions",status="200"' in metrics.text
            assert (await scraper.post("/v1/chat/completions", json=CHAT)).status_code == 404


async def test_a_non_loopback_bind_without_keys_warns_on_stderr() -> None:
    async with _serving_process("serve", "--host", "0.0.0.0") as served:
        with trio.fail_after(30):
            warning = await served.stderr()
        assert "WARNING: listening on 0.0.0.0" in warning
        assert "--api-key KEY" in warning and "INTERLOCK_API_KEY" in warning
        # Still serving, without keys: a private network may want that.
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    for argv in (["--host", "0.0.0.0", "--api-key", KEY], ["--host", "127.0.0.1"]):
        async with _serving_process("serve", *argv) as served:
            # The warning would be printed right after the banner, before the server task
            # yields: once a request has been answered, it would be out.
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                assert (await client.get("/live")).status_code == 200
            served.process.kill()
            assert served.process.stderr is not None
            rest = b""
            with trio.fail_after(30):
                while chunk := await served.process.stderr.receive_some(65536):
                    rest += chunk
            assert b"WARNING" not in rest, rest.decode()


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.0.0.5", True),
        ("frontend.internal", True),
    ],
)
def test_which_binds_warn_without_keys(host: str, warns: bool) -> None:
    assert (exposure_warning("serve", host, ApiKeys()) is not None) is warns
    assert exposure_warning("serve", host, ApiKeys([KEY])) is None


async def test_route_with_api_keys_and_route_once_with_a_key() -> None:
    body = '{"token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}'
    async with (
        _serving_process("route", "--workers", "2", "--api-key", KEY) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
    ):
        _assert_unauthorized(await client.post("/v1/route", content=body))
        # On a router the route-only API is what it serves: an ordinary key may use it.
        answer = await client.post("/v1/route", content=body, headers=_bearer(KEY))
        assert answer.status_code == 200 and answer.json()["decode_worker_id"] in (1, 2)
        once = [*_command(), "route", "--url", served.url, "--once", body]
        refused = await trio.run_process(once, capture_stdout=True, check=False)
        assert refused.returncode == 1 and b"invalid_api_key" in refused.stdout
        allowed = await trio.run_process(
            [*once, "--api-key", KEY], capture_stdout=True, check=False
        )
        assert allowed.returncode == 0, allowed.stdout
        assert b'"decode_worker_id"' in allowed.stdout


# -- trusted callers, in-process ----------------------------------------------------------------

# Decode workers 1 and 2, prefill worker 3; requests may name them.
_PINNING = PipelineConfig(allow_request_worker_ids=True)
_DISAGG: dict[str, Any] = {"workers": 2, "prefill_workers": 1}
_KEYS = ApiKeys([KEY], trusted=[TRUSTED_KEY])

# (the param a 403 names, extra body fields, headers)
_PRIVILEGES = [
    ("nvext.backend_instance_id", {"nvext": {"backend_instance_id": 1}}, {}),
    ("nvext.decode_worker_id", {"nvext": {"decode_worker_id": 2}}, {}),
    ("nvext.prefill_worker_id", {"nvext": {"prefill_worker_id": 3, "decode_worker_id": 2}}, {}),
    ("nvext.dp_rank", {"nvext": {"dp_rank": 0}}, {}),
    ("x-worker-instance-id", {}, {"x-worker-instance-id": "2"}),
    ("x-prefill-instance-id", {}, {"x-prefill-instance-id": "3"}),
    ("x-dp-rank", {}, {"x-dp-rank": "0"}),
    ("x-enable-local-updates", {}, {"x-enable-local-updates": "false"}),
    ("nvext.annotations", {"nvext": {"annotations": ["query_instance_id:"]}}, {}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "headers", "param"),
    [pytest.param(e, h, p, id=p) for p, e, h in _PRIVILEGES],
)
async def test_each_privilege_needs_a_trusted_key(
    extra: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    body = {**CHAT, **extra}
    async with (
        serving(_PINNING, api_keys=_KEYS, **_DISAGG) as served,
        served.client() as client,
    ):
        refused = await client.post(
            "/v1/chat/completions", json=body, headers={**headers, **_bearer(KEY)}
        )
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "permission_denied" and error["param"] == param
        assert error["type"] == "invalid_request_error"
        assert "trusted" in error["message"] and "--trusted-api-key" in error["message"]
        for stream in (False, True):
            allowed = await client.post(
                "/v1/chat/completions",
                json={**body, "stream": stream},
                headers={**headers, **_bearer(TRUSTED_KEY)},
            )
            assert allowed.status_code == 200, allowed.text
        # Nothing was booked or left running by the refused request.
        await served.wait_idle()


@pytest.mark.parametrize(
    ("extra", "headers"),
    [pytest.param(e, h, id=p) for p, e, h in _PRIVILEGES],
)
async def test_without_keys_every_caller_has_every_privilege(
    extra: dict[str, Any], headers: dict[str, str]
) -> None:
    # No keys: the server behaves as it always did (the loopback development default).
    for keys in (None, ApiKeys()):
        async with (
            serving(_PINNING, api_keys=keys, **_DISAGG) as served,
            served.client() as client,
        ):
            answer = await client.post(
                "/v1/chat/completions", json={**CHAT, **extra}, headers=headers
            )
            assert answer.status_code == 200, answer.text
            assert (await client.get("/v1/models")).status_code == 200


async def test_the_route_only_api_needs_a_trusted_key_beside_generation() -> None:
    route = {"token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "book": True, "request_id": "r1"}
    async with (
        serving(route_api=True, api_keys=_KEYS) as served,
        served.client() as client,
    ):
        _assert_unauthorized(await client.post("/v1/route", json=route))
        for path in ("/v1/route", "/v1/route/r1/prefill_complete", "/v1/route/r1/free"):
            refused = await client.post(path, json=route, headers=_bearer(KEY))
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["error"]["code"] == "permission_denied"
        booked = await client.post("/v1/route", json=route, headers=_bearer(TRUSTED_KEY))
        assert booked.status_code == 200 and booked.json()["booked"] is True
        for path in ("/v1/route/r1/prefill_complete", "/v1/route/r1/free"):
            answer = await client.post(path, headers=_bearer(TRUSTED_KEY))
            assert answer.status_code == 200, answer.text
        # The ordinary key still generates.
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(KEY))
        assert answer.status_code == 200


async def test_what_the_routing_requires_is_no_privilege() -> None:
    # direct_to_known: every request names its worker, so any key may; the load booking
    # header stays a privilege.
    direct = PipelineConfig(routing="direct_to_known")
    async with serving(direct, api_keys=_KEYS) as served, served.client() as client:
        pinned = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-worker-instance-id": "1", **_bearer(KEY)}
        )
        assert pinned.status_code == 200, pinned.text
        hidden = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={
                "x-worker-instance-id": "1",
                "x-enable-local-updates": "false",
                **_bearer(KEY),
            },
        )
        assert hidden.status_code == 403
    # A server that only answers queries: queries and the route-only API are what it serves.
    query = PipelineConfig(routing="query_only")
    async with serving(query, route_api=True, api_keys=_KEYS) as served, served.client() as client:
        for body in (CHAT, {**CHAT, "nvext": {"annotations": ["query_instance_id"]}}):
            answer = await client.post("/v1/chat/completions", json=body, headers=_bearer(KEY))
            assert answer.status_code == 200 and "worker_id" in answer.json()["nvext"]
        routed = await client.post("/v1/route", json={"prompt": "hi"}, headers=_bearer(KEY))
        assert routed.status_code == 200, routed.text


async def test_a_refused_pin_is_still_refused_by_the_configuration_first() -> None:
    # Without --allow-request-worker-ids a pin is a 400 for everyone, trusted or not: a 403
    # would send the caller after a trusted key that cannot help.
    async with serving(api_keys=_KEYS) as served, served.client() as client:
        for key in (KEY, TRUSTED_KEY):
            answer = await client.post(
                "/v1/chat/completions",
                json=CHAT,
                headers={"x-worker-instance-id": "1", **_bearer(key)},
            )
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "worker_ids_not_allowed"


async def test_only_trusted_keys_shut_out_everyone_else() -> None:
    async with (
        serving(api_keys=ApiKeys(trusted=[TRUSTED_KEY])) as served,
        served.client() as client,
    ):
        _assert_unauthorized(await client.post("/v1/chat/completions", json=CHAT))
        _assert_unauthorized(
            await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(KEY))
        )
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=_bearer(TRUSTED_KEY))
        assert answer.status_code == 200
        assert (await client.get("/health")).status_code == 200


# -- the key set ---------------------------------------------------------------------------------

_TOKENS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@given(keys=st.lists(_TOKENS, max_size=4), trusted=st.lists(_TOKENS, max_size=3), token=_TOKENS)
def test_a_key_is_accepted_exactly_when_configured(
    keys: list[str], trusted: list[str], token: str
) -> None:
    api_keys = ApiKeys(keys, trusted)
    headers = [(b"authorization", b"Bearer " + token.encode())]
    if not keys and not trusted:
        assert api_keys.authenticate(headers) is True
    elif token in keys or token in trusted:
        assert api_keys.authenticate(headers) is (token in trusted)
    else:
        with pytest.raises(Exception, match="not one this server accepts") as caught:
            api_keys.authenticate(headers)
        assert getattr(caught.value, "status", None) == 401


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    # No early exit: how long a check takes says nothing about which key (if any) matched.
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(["a1", "b2", "c3"], trusted=["t1", "t2"])
    for token in ("a1", "c3", "t2", "nope"):
        calls.clear()
        try:
            keys.authenticate([(b"authorization", f"Bearer {token}".encode())])
        except Exception:
            pass
        assert len(calls) == 5, token


@pytest.mark.parametrize("bad", ["", "has space", "tab\tkey", "ключ"])
def test_a_key_a_client_cannot_send_is_a_config_error_that_does_not_echo_it(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = frontend_parser().parse_args(["serve", "--api-key", bad])
    assert args.run(args) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "invalid configuration" in err
    if bad:
        assert bad not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("# only a comment\n\n", "holds no key"),
        ("good-key\nbad key\n", "line 2"),
    ],
)
def test_a_bad_key_file_stops_the_server_before_it_starts(
    tmp_path: Path, content: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    args = frontend_parser().parse_args(["serve", "--trusted-api-key-file", str(path)])
    assert args.run(args) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_keys_precedence_flags_environment_config_file(tmp_path: Path) -> None:
    key_file = tmp_path / "trusted"
    key_file.write_text("sk-file-trusted\n")
    config = tmp_path / "interlock.toml"
    config.write_text(
        'routing = "discover"\n\n[server]\napi_keys = ["sk-config-1", "sk-config-2"]\n'
        f'trusted_api_key_file = "{key_file}"\n'
    )
    parse = frontend_parser().parse_args
    args = parse(["serve", "--config", str(config)])
    assert resolve_api_keys(args, environ={}) == (
        ["sk-config-1", "sk-config-2"],
        ["sk-file-trusted"],
        (f"from {config} [server]", f"trusted from {config} [server]"),
    )
    # The environment wins over the file, kind by kind.
    environ = {"INTERLOCK_API_KEY": "sk-env"}
    ordinary, trusted, _ = resolve_api_keys(args, environ=environ)
    assert (ordinary, trusted) == (["sk-env"], ["sk-file-trusted"])
    # And the flags win over both.
    args = parse(["serve", "--config", str(config), "--api-key", "sk-flag"])
    assert resolve_api_keys(args, environ=environ)[0] == ["sk-flag"]
    # The knobs of the same file still apply; [server] holds no knob.
    assert PipelineConfig.from_toml(config).routing == "discover"


def test_a_typo_in_the_server_table_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text('[server]\napi_key = "sk-1"\n')
    with pytest.raises(ConfigError, match="did you mean 'api_keys'"):
        PipelineConfig.server_table(config)
    config.write_text('[server]\napi_keys = "sk-1"\n')
    with pytest.raises(ConfigError, match="api_keys must be a list of strings"):
        PipelineConfig.server_table(config)
