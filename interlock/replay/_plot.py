"""``--plot``: the TTFT distribution per policy and the hit rates against their bound.

matplotlib is optional (the ``plot`` extra) and imported only here, only when asked for.
"""

from __future__ import annotations

import os
from typing import Any

from ._runner import ReplayReport


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: pip install 'interlock[plot]' "
            "(or pip install matplotlib), or leave out --plot"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: ReplayReport, path: str | os.PathLike[str]) -> None:
    """Write a PNG: left, the CDF of time to first token per policy (log scale); right, each
    policy's prefix hit rate with the combined-capacity bound as a dashed line.

    Raises:
        PlotUnavailable: matplotlib is missing.
        OSError: the file cannot be written.
    """
    plt = _pyplot()
    figure, (cdf, bars) = plt.subplots(
        1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]}, layout="constrained"
    )
    for policy in report.policies:
        values = policy.ttft_ms
        if not values:
            continue
        n = len(values)
        cdf.step(values, [(i + 1) / n for i in range(n)], where="post", label=policy.policy)
    cdf.set_xscale("log")
    cdf.set_xlabel("time to first token (ms, simulated)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_ylim(0, 1)
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right")
    cdf.set_title("TTFT CDF")
    labels = [p.policy for p in report.policies]
    rates = [p.hit_rate for p in report.policies]
    bars.bar(labels, rates, color=[f"C{i}" for i in range(len(labels))])
    bars.axhline(
        report.hit_rate_bound, color="black", linestyle="--", label="combined-capacity bound"
    )
    for x, rate in enumerate(rates):
        bars.annotate(f"{rate:.3f}", (x, rate), ha="center", va="bottom")
    bars.set_ylabel("prefix hit rate (cached / prompt tokens)")
    bars.set_ylim(0, max([report.hit_rate_bound, *rates]) * 1.15 or 1)
    bars.legend(loc="lower right")
    bars.set_title("prefix hit rate")
    bars.tick_params(axis="x", labelrotation=20)
    scale = report.settings.rate_scale
    figure.suptitle(
        f"{report.trace}: {report.requests:,} requests"
        + (f", arrivals x{scale:g}" if scale != 1 else "")
        + f", {report.settings.workers} workers",
        fontsize=11,
    )
    figure.savefig(os.fspath(path), dpi=110, metadata={"Software": None})
    plt.close(figure)
