"""``interlock replay``: trace readers, the combined-capacity bound, seeded replays of small
slices of each trace (counts and orderings, not times), byte-identical reports for the same
seed, faults during a replay, and the command line.

The traces are read in place from ../shared/data/traces (relative to the repository root)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from interlock import ConfigError, PipelineConfig
from interlock.kv import compute_block_hashes, compute_sequence_hashes
from interlock.replay import (
    ReplayPolicy,
    ReplayReport,
    ReplaySettings,
    Trace,
    TraceError,
    combined_capacity_hit_rate,
    parse_policies,
    read_trace,
    render_json,
    render_report,
    replay,
)
from interlock.replay.__main__ import main
from interlock.testing import parse_fault_spec

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "traces"
CONVERSATION = TRACES / "mooncake_fast25_conversation_trace.jsonl"
SYNTHETIC = TRACES / "mooncake_fast25_synthetic_trace.jsonl"
AZURE_CODE = TRACES / "azure_llm_2023_code.csv"
AZURE_CONV = TRACES / "azure_llm_2023_conv.csv"

needs_traces = pytest.mark.skipif(
    not CONVERSATION.exists(), reason=f"the shared traces are not at {TRACES}"
)

SLICE = 40
SETTINGS = ReplaySettings(workers=4, num_gpu_blocks=4096, seed=7)


# -- readers ------------------------------------------------------------------------------------


@needs_traces
def test_the_mooncake_reader_gives_seconds_lengths_and_hash_ids() -> None:
    trace = read_trace(CONVERSATION, limit=50)
    assert (trace.format, len(trace.requests)) == ("mooncake", 50)
    first = trace.requests[0]
    assert (first.at, first.input_length, first.output_length) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert [r.at for r in trace.requests[9:11]] == [0.0, 3.0]  # milliseconds in the file
    for request in trace.requests:
        assert len(request.hash_ids) == -(-request.input_length // 512)
        assert len(request.token_ids()) == request.input_length


@needs_traces
def test_prompts_share_exactly_their_common_hash_ids_at_any_block_size() -> None:
    a, b = read_trace(CONVERSATION, limit=2).requests  # both start with hash id 0, then differ
    ta, tb = a.token_ids(), b.token_ids()
    common = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y)
    assert common == 512
    for block_size in (16, 64, 128, 512):
        ha = compute_sequence_hashes(compute_block_hashes(ta, block_size))
        hb = compute_sequence_hashes(compute_block_hashes(tb, block_size))
        shared = next(i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y)
        assert shared == 512 // block_size


@needs_traces
def test_the_synthetic_mooncake_trace_reads_too() -> None:
    trace = read_trace(SYNTHETIC, limit=100)
    assert len(trace.requests) == 100
    assert all(b.at >= a.at for a, b in zip(trace.requests, trace.requests[1:], strict=False))


@needs_traces
@pytest.mark.parametrize("path", [AZURE_CODE, AZURE_CONV], ids=["code", "conv"])
def test_the_azure_reader_gives_relative_seconds_and_shares_nothing(path: Path) -> None:
    trace = read_trace(path, limit=200)
    assert (trace.format, len(trace.requests)) == ("azure", 200)
    assert trace.requests[0].at == 0.0
    assert 0 < trace.requests[-1].at < 600
    ids = [h for r in trace.requests for h in r.hash_ids]
    assert len(ids) == len(set(ids)), "Azure rows carry no prefix information"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "t.jsonl",
            '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": [0], "x": 1}\n',
            r"t\.jsonl:1: unknown key 'x'",
        ),
        ("t.jsonl", '{"timestamp": 0, "input_length": 3, "output_length": 1}\n', "'hash_ids'"),
        (
            "t.jsonl",
            '{"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": [0]}\n'
            '{"timestamp": 4, "input_length": 3, "output_length": 1, "hash_ids": [0]}\n',
            r"t\.jsonl:2: timestamp 4 ms goes back in time",
        ),
        (
            "t.jsonl",
            '{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [0]}\n',
            r"1 hash_ids for input_length=1100; expected ceil\(1100 / 512\) = 3",
        ),
        ("t.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("t.csv", "when,ContextTokens,GeneratedTokens\n", "expected the header"),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n",
            r"t\.csv:2: TIMESTAMP 'yesterday' is not a time",
        ),
        ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "holds no requests"),
    ],
)
def test_a_bad_trace_names_its_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_a_trace_without_its_last_partial_id_gets_one_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "floor.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 1100, "output_length": 2, "hash_ids": [4, 5]}'
    )
    (request,) = read_trace(path).requests
    assert request.hash_ids[:2] == (4, 5)
    assert len(request.hash_ids) == 3
    assert len(request.token_ids()) == 1100


# -- the combined-capacity bound ------------------------------------------------------------------


@needs_traces
def test_the_bound_is_pure_monotone_and_exact_without_eviction() -> None:
    trace = read_trace(CONVERSATION, limit=300)
    prompts = [r.token_ids() for r in trace.requests]

    def bound(capacity: int) -> float:
        return combined_capacity_hit_rate(prompts, capacity_blocks=capacity, block_size=64)

    small, large, unbounded = bound(2_000), bound(20_000), bound(10**7)
    assert small == bound(2_000)
    assert small <= large <= unbounded
    assert small < unbounded
    # Without eviction: every block seen before is a hit, up to the first one that is not.
    seen: set[int] = set()
    cached = 0
    for prompt in prompts:
        hashes = compute_sequence_hashes(compute_block_hashes(prompt, 64))
        hits = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        cached += hits * 64
        seen.update(hashes)
    assert unbounded == cached / sum(map(len, prompts))


# -- replays --------------------------------------------------------------------------------------


def conversations_slice(limit: int) -> Trace:
    """The first ``limit`` requests of conversations with 4 or more turns among the first
    2,000 requests (requests sharing their first 4 hash ids): a slice with prefixes to reuse,
    where a slice by time has almost none (turns are minutes apart)."""
    trace = read_trace(CONVERSATION, limit=2000)
    turns = collections.Counter(r.hash_ids[:4] for r in trace.requests if len(r.hash_ids) >= 8)
    chosen = [r for r in trace.requests if len(r.hash_ids) >= 8 and turns[r.hash_ids[:4]] >= 4]
    return attrs.evolve(trace, requests=tuple(chosen[:limit]))


@pytest.fixture(scope="module")
def conversation_replay() -> tuple[ReplayReport, ReplayReport]:
    trace = conversations_slice(SLICE)
    policies = parse_policies("round_robin,kv,predicted_ttft")
    return replay(trace, policies, SETTINGS), replay(trace, policies, SETTINGS)


@needs_traces
def test_a_mooncake_slice_completes_under_every_policy(
    conversation_replay: tuple[ReplayReport, ReplayReport],
) -> None:
    report, _ = conversation_replay
    assert [p.policy for p in report.policies] == ["round_robin", "kv", "predicted_ttft"]
    for policy in report.policies:
        assert (policy.requests, policy.completed, policy.failed) == (SLICE, SLICE, 0)
        assert sum(policy.requests_per_worker) == SLICE
        assert 0 < policy.hit_rate <= report.hit_rate_bound
        assert policy.sim_seconds > report.span_seconds
        assert policy.ttft_p50_ms <= policy.ttft_p90_ms <= policy.ttft_p99_ms
        assert policy.migrations == policy.fallbacks == 0
    by_name = {p.policy: p for p in report.policies}
    assert by_name["round_robin"].requests_per_worker == (SLICE // 4,) * 4
    assert by_name["kv"].hit_rate > by_name["round_robin"].hit_rate
    assert by_name["predicted_ttft"].hit_rate > by_name["round_robin"].hit_rate


@needs_traces
def test_the_same_seed_gives_byte_identical_reports(
    conversation_replay: tuple[ReplayReport, ReplayReport],
) -> None:
    first, again = conversation_replay
    assert render_report(first, timing=False) == render_report(again, timing=False)
    assert render_json(first, timing=False) == render_json(again, timing=False)
    assert "wall" not in render_json(first, timing=False)


@needs_traces
@pytest.mark.parametrize(
    ("path", "limit"), [(SYNTHETIC, 30), (AZURE_CONV, 100)], ids=["synthetic", "azure-conv"]
)
def test_a_slice_of_each_other_trace_replays(path: Path, limit: int) -> None:
    trace = read_trace(path, limit=limit)
    report = replay(trace, parse_policies("round_robin,kv"), SETTINGS)
    rr, kv = report.policies
    for policy in (rr, kv):
        assert (policy.completed, policy.failed) == (limit, 0)
        assert policy.hit_rate <= report.hit_rate_bound
    assert kv.hit_rate >= rr.hit_rate
    assert rr.requests_per_worker == (limit // 4 + 1,) * (limit % 4) + (limit // 4,) * (
        4 - limit % 4
    )


@needs_traces
def test_an_azure_slice_replays_with_nothing_to_share() -> None:
    trace = read_trace(AZURE_CODE, limit=150)
    report = replay(trace, parse_policies("round_robin,kv"), SETTINGS)
    assert report.hit_rate_bound == 0.0
    for policy in report.policies:
        assert (policy.completed, policy.failed, policy.hit_rate) == (150, 0, 0.0)


@needs_traces
def test_a_crash_during_replay_migrates_every_stream() -> None:
    trace = read_trace(CONVERSATION, limit=24)
    settings = ReplaySettings(workers=3, seed=1, faults=parse_fault_spec("crash:1@4s+5s"))
    base = PipelineConfig(migration_limit=2)
    report = replay(trace, parse_policies("round_robin", base), settings)
    (policy,) = report.policies
    assert policy.migrations >= 1
    assert (policy.completed, policy.failed) == (24, 0)


@needs_traces
def test_without_migration_a_crash_fails_the_streams_it_breaks() -> None:
    trace = read_trace(CONVERSATION, limit=24)
    settings = ReplaySettings(workers=3, seed=1, faults=parse_fault_spec("crash:1@4s+5s"))
    (policy,) = replay(trace, parse_policies("round_robin"), settings).policies
    assert policy.failed >= 1
    assert policy.completed + policy.failed == 24


@needs_traces
def test_rate_scale_compresses_the_arrivals() -> None:
    trace = read_trace(CONVERSATION, limit=30)
    assert trace.scaled(3.0).span == pytest.approx(trace.span / 3)
    with pytest.raises(ValueError, match="rate_scale"):
        ReplaySettings(rate_scale=0.0)


# -- policies -------------------------------------------------------------------------------------


def test_a_policy_is_a_router_mode_or_a_configuration_file(tmp_path: Path) -> None:
    tuned = tmp_path / "tuned_kv.toml"
    tuned.write_text('router_mode = "kv"\noverlap_score_weight = 2.0\n')
    policies = parse_policies(f"kv,{tuned},mine={tuned}")
    assert [p.label for p in policies] == ["kv", "tuned_kv", "mine"]
    assert policies[1].config.overlap_score_weight == 2.0
    config = policies[0].pipeline_config(ReplaySettings(block_size=32))
    assert (config.router_mode, config.kv_block_size) == ("kv", 32)


def test_a_policy_may_change_knobs_inline() -> None:
    (plain, heavy, warm) = parse_policies(
        "kv,kv:overlap_score_weight=4,predicted_ttft:router_temperature=0.5:router_seed=7"
    )
    assert heavy.label == "kv:overlap_score_weight=4"
    assert (heavy.config.router_mode, heavy.config.overlap_score_weight) == ("kv", 4.0)
    assert plain.config.overlap_score_weight == 1.0
    assert (warm.config.router_temperature, warm.config.router_seed) == (0.5, 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kv,quantum", "unknown policy 'quantum'"),
        ("kv,kv", "given twice"),
        ("direct", "unknown policy 'direct'"),
        ("x=kv", "needs a .toml"),
        ("kv:overlap_score_weight", "is not KNOB=VALUE"),
        ("kv:overlap_score_weight=heavy", "'kv:overlap_score_weight=heavy': .*not a valid float"),
        ("kv:overlap_score_weight=-1", "overlap_score_weight must be >= 0"),
        ("kv:overlap_weight=2", "unknown configuration key 'overlap_weight'"),
        ("kv:router_mode=random", "sets router_mode"),
        ("kv:kv_block_size=16", "--block-size"),
        ("quantum:router_seed=1", "unknown policy 'quantum'"),
    ],
)
def test_a_bad_policy_list_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policies(text)


def test_a_policy_file_may_not_set_the_block_size(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('router_mode = "kv"\nkv_block_size = 16\n')
    with pytest.raises(ConfigError, match="--block-size"):
        ReplayPolicy.parse(str(path))


# -- the command line -----------------------------------------------------------------------------


def _cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    status = main([*args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@needs_traces
def test_the_cli_prints_one_json_object_per_policy(capsys: Any) -> None:
    status, out, _ = _cli(
        capsys,
        str(CONVERSATION),
        "--limit=12",
        "--workers=2",
        "--policies=round_robin,kv",
        "--json",
        "--no-timing",
    )
    assert status == 0
    rows = json.loads(out)
    assert [row["policy"] for row in rows] == ["round_robin", "kv"]
    for row in rows:
        assert row["requests"] == row["completed"] == 12
        for key in ("hit_rate", "hit_rate_bound", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms"):
            assert isinstance(row[key], float)
        assert "wall_seconds" not in row


@needs_traces
def test_the_cli_table_and_plot(capsys: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    status, out, err = _cli(
        capsys, str(AZURE_CODE), "--limit=20", "--policies=round_robin,kv", f"--plot={png}"
    )
    assert status == 0, err
    assert "TTFT p50 ms" in out and "simulated s per wall s" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_traces
def test_the_cli_explains_a_missing_matplotlib(
    capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    status, _, err = _cli(
        capsys, str(AZURE_CODE), "--limit=5", "--policies=kv", f"--plot={tmp_path / 'x.png'}"
    )
    assert status == 2
    assert "pip install 'interlock[plot]'" in err


@needs_traces
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--faults=crash:9@1s"], "names worker 9, but the cluster has workers 0 to 7"),
        (["--faults=boom"], "does not parse"),
        (["--policies=kv,fast"], "unknown policy 'fast'"),
        (["--config=missing.toml"], "does not exist"),
    ],
)
def test_the_cli_refuses_bad_input_with_status_2(
    capsys: Any, args: list[str], message: str
) -> None:
    status, _, err = _cli(capsys, str(CONVERSATION), "--limit=3", *args)
    assert status == 2
    assert message in err


def test_the_cli_names_a_missing_trace(capsys: Any, tmp_path: Path) -> None:
    status, _, err = _cli(capsys, str(tmp_path / "nope.jsonl"))
    assert status == 2
    assert "cannot read trace" in err


def test_matplotlib_is_imported_only_for_a_plot() -> None:
    code = "import sys, interlock.replay; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_replay_api_is_pinned() -> None:
    import interlock.replay

    assert sorted(interlock.replay.__all__) == sorted(
        [
            "TOKENS_PER_HASH",
            "TRACE_FORMATS",
            "PlotUnavailable",
            "PolicyReport",
            "ReplayPolicy",
            "ReplayProgress",
            "ReplayReport",
            "ReplaySettings",
            "Trace",
            "TraceError",
            "TraceFormat",
            "TraceRequest",
            "add_parser",
            "combined_capacity_hit_rate",
            "detect_format",
            "parse_policies",
            "plot_report",
            "read_trace",
            "render_json",
            "render_report",
            "replay",
            "replay_policy",
            "report_json",
            "report_table",
            "trace_bound",
            "trace_workload",
        ]
    )
    for name in interlock.replay.__all__:
        assert hasattr(interlock.replay, name), name


def test_the_progress_bar_follows_each_policy(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from interlock.replay._cli import _Progress

    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": i * 1000, "input_length": 600, "output_length": 4, "hash_ids": [0, i + 1]}
        for i in range(5)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with _Progress(console) as progress:
        report = replay(read_trace(path), parse_policies("round_robin,kv"), progress=progress)
    assert [p.completed for p in report.policies] == [5, 5]
    drawn = screen.getvalue()
    assert "round_robin" in drawn and "kv" in drawn and "5/5" in drawn
