"""Every figure of ``fedlora compare`` and ``fedlora study``, drawn from numbers and run
directories handed in (this module knows no output layout).

matplotlib is imported on first use, with the file-only Agg backend.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from ..runner import eval_curve, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(plt, n: int) -> list:
    """One distinct colour per line (tab10 repeats past ten)."""
    colours = plt.get_cmap("tab20" if n > 10 else "tab10").colors
    return [colours[i % len(colours)] for i in range(n)]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot_curves(runs: Mapping[str, list[Path]], seeds: list[int], out: Path, metric: str = "accuracy",
                lines: Mapping[str, float] | None = None) -> None:
    """``out``/<metric>_vs_round.png and <metric>_vs_upload.png: each method's held-out ``metric``
    (mean over its runs, one per seed, with the seeds' spread) against round and upload.

    Args:
        runs: method -> its run directories, one per seed in ``seeds`` order.
        lines: reference lines drawn level across both plots: name -> its final ``metric``.
        metric: an ``eval_*`` key of metrics.jsonl without the prefix (accuracy, rouge_l, loss).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig_r, ax_r = plt.subplots(figsize=(7.5, 4))
    fig_b, ax_b = plt.subplots(figsize=(7.5, 4))
    for (m, dirs), colour in zip(runs.items(), _colours(plt, len(runs))):
        curves = [eval_curve(d, metric) for d in dirs]
        n = min(len(c) for c in curves)
        rounds = [curves[0][i][0] for i in range(n)]
        mb = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        acc, spread = zip(*(_mean_std([c[i][2] for c in curves]) for i in range(n)))
        for ax, xs in ((ax_r, rounds), (ax_b, mb)):
            (line,) = ax.plot(xs, acc, marker="o", label=m, color=colour)
            if len(seeds) > 1:  # the seeds' spread: gaps inside it are not differences
                ax.fill_between(xs, [a - s for a, s in zip(acc, spread)], [a + s for a, s in zip(acc, spread)],
                                color=line.get_color(), alpha=0.12, linewidth=0)
    for ax in (ax_r, ax_b):
        for (name, acc), style in zip((lines or {}).items(), ("--", ":", "-.")):
            ax.axhline(acc, color="black", linestyle=style, linewidth=1, label=f"{name} (reference)")
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    for ax, xlabel in ((ax_r, "round"), (ax_b, "cumulative upload (MB, all clients)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"global test {metric.replace('_', '-')}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the curves
    for fig, name in ((fig_r, f"{metric}_vs_round.png"), (fig_b, f"{metric}_vs_upload.png")):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


DIAGNOSTICS = (("fidelity", "aggregation error (0 = exact)"), ("effective_rank", "effective rank of the global ΔW"))


def plot_diagnostics(runs: Mapping[str, list[Path]], out: Path) -> Path | None:
    """``out``/diagnostics.png: each method's per-round aggregation fidelity and effective rank
    (mean over its runs); None when no run recorded them."""
    series = {}
    for m, dirs in runs.items():
        rows = [read_metrics(d) for d in dirs]
        for key, _ in DIAGNOSTICS:
            per_round: dict[int, list[float]] = {}
            for rs in rows:
                for r in rs:
                    if key in r:
                        per_round.setdefault(r["round"], []).append(r[key])
            if per_round:
                series[(m, key)] = sorted((rnd, statistics.fmean(v)) for rnd, v in per_round.items())
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, DIAGNOSTICS):
        for m, colour in zip(runs, _colours(plt, len(runs))):
            if (m, key) in series:
                xs, ys = zip(*series[(m, key)])
                ax.plot(xs, ys, marker=".", label=m, color=colour)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=120)
    plt.close(fig)
    return out / "diagnostics.png"


def plot_ablation(labels: list[str], values: Mapping[str, list[list[float]]], x_label: str, title: str,
                  path: Path, y_label: str = "final test accuracy") -> None:
    """One ablation: per method (one colour), its mean ± std per variant and every seed's value as
    faint dots; the methods sit slightly apart along x so that their points do not overlap.

    Args:
        values: method -> per variant (in ``labels`` order) -> the final metric (accuracy, answer loss)
            of each seed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, ((m, per_variant), colour) in enumerate(zip(values.items(), _colours(plt, len(values)))):
        shift = 0.12 * (i - (len(values) - 1) / 2)  # the methods side by side around each variant
        xs = [x + shift for x in range(len(labels))]
        for seeds in zip(*per_variant):  # one seed's value at every variant
            ax.plot(xs, seeds, "o", alpha=0.3, markersize=4, color=colour, linestyle="none")
        means, stds = zip(*(_mean_std(v) for v in per_variant))
        ax.errorbar(xs, means, yerr=stds, marker="s", capsize=4, color=colour, label=f"{m} (mean ± std)")
    ax.set_xticks(list(range(len(labels))), labels)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{title}\n(faint dots: one seed each)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
