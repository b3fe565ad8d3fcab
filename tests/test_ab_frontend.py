"""benchmarks/ab_frontend.py's order handling: every checkout goes first equally often, the
ratio it prints is free of a bias of going first, and the KV events port it picks is one no
port-0 bind can take. No process is started and no timing figure is asserted."""

from __future__ import annotations

import socket

from helpers import load_benchmark
from hypothesis import given
from hypothesis import strategies as st

AB = load_benchmark("ab_frontend")


def test_every_checkout_goes_first_equally_often() -> None:
    srcs = [["base", "/a"], ["new", "/b"], ["third", "/c"]]
    firsts = [AB.in_turn(srcs, r)[0][0] for r in range(6)]
    assert firsts == ["base", "new", "third"] * 2
    # The rest keep their order behind the first (a rotation, not a shuffle).
    assert AB.in_turn(srcs, 1) == [srcs[1], srcs[2], srcs[0]]


@given(
    true_ratio=st.floats(0.5, 2.0),
    bias=st.floats(0.8, 1.25),
    base_first=st.integers(1, 5),
    new_first=st.integers(1, 5),
)
def test_the_order_balanced_ratio_cancels_a_bias_of_going_first(
    true_ratio: float, bias: float, base_first: int, new_first: int
) -> None:
    # Going first multiplies a checkout's cost by `bias`: new/base reads true/bias with the
    # base first and true*bias with new first, in any number of rounds of each.
    ratios = [true_ratio / bias] * base_first + [true_ratio * bias] * new_first
    firsts = ["base"] * base_first + ["new"] * new_first
    balanced, split = AB.order_balanced(ratios, firsts, ["base", "new"])
    assert abs(balanced - true_ratio) < 1e-9 * true_ratio
    assert split == {"base": ratios[:base_first], "new": ratios[base_first:]}


def test_the_kv_events_port_is_below_the_ephemeral_range_and_free() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    port = AB.port_below_ephemeral()
    assert port < low
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
