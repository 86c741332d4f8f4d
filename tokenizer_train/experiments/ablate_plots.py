"""The PNG plots of ablate: code usage per variant, and curves of code statistics and
validation figures with one line per variant (matplotlib, Agg backend, atomic writes)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from motion_data.inspect.plots import _pyplot, _save

from tokenizer_train.evaluate import check as C
from tokenizer_train.experiments.variants import BASELINE, RECOMMENDED
# the two runs every reader compares first get fixed, unlike styles; the rest cycle
FIXED = {BASELINE: ("black", "-", "o"), RECOMMENDED: ("tab:red", "--", "s")}
COLOURS = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
LINES = ("-.", ":", "-", "--")
MARKERS = ("^", "D", "v", "P", "X", "*", "<", ">")
MAX_MARKERS = 12  # per line: a marker on every point of a short series, about this many on a long one

ENTROPY_PANELS = [("train/entropy_norm_step", "train/entropy_norm_step"),
                  ("train/unique_codes_step", "train/unique_codes_step")]
ACCURACY_PANELS = [("val/code_info_bits_epoch", "val/code_info_bits_epoch (bits/label)"),
                   ("val/acc_epoch", "val/acc_epoch"),
                   ("val/acc_noncenter_epoch", "val/acc_noncenter_epoch")]


def style(variant: str, i: int) -> dict:
    """Line colour, style and marker of the i-th variant (colour, dash and marker all differ)."""
    colour, ls, marker = FIXED.get(variant, (COLOURS[i % len(COLOURS)], LINES[i % len(LINES)],
                                             MARKERS[i % len(MARKERS)]))
    return {"color": colour, "ls": ls, "marker": marker,
            "lw": 2.2 if variant in FIXED else 1.4, "ms": 7 if variant in FIXED else 5}


def curves_figure(rows_by_variant: dict[str, list], panels, ylabel: str = "value"):
    """One panel per (tag, title), one line per variant that logged the tag, a legend on each
    panel; a run with one logged value (one epoch) shows as its marker."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, (tag, title) in zip(axes[0], panels):
        for i, (v, rows) in enumerate(rows_by_variant.items()):
            s = C.series(rows, tag)
            if not s:
                continue
            st = style(v, i)
            ax.plot([x for x, _, _ in s], [y for _, _, y in s], label=v,
                    markevery=max(1, math.ceil(len(s) / MAX_MARKERS)), **st)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer step", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=11)
    fig.tight_layout()
    return fig


def usage_figure(rows_by_variant: dict[str, list], seed: int):
    """Per variant: the shares of the codes of the last logged usage counts, ranked, log scale."""
    plt = _pyplot()
    n = len(rows_by_variant)
    cols = min(3, n)
    nrow = math.ceil(n / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(5.2 * cols, 3.9 * nrow), squeeze=False)
    for ax, (v, rows) in zip(axes.ravel(), rows_by_variant.items()):
        h = C.series(rows, "val/code_usage_hist") or C.series(rows, "train/code_usage_hist")
        c = np.sort(np.asarray(h[-1][2], np.float64))[::-1] if h else np.zeros(0)
        c = c[c > 0]
        if c.size:
            ax.bar(np.arange(1, c.size + 1), c / c.sum(), width=1.0, color=style(v, 0)["color"])
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no code usage logged", ha="center", va="center", transform=ax.transAxes, fontsize=11)
        ax.set_title(f"{v} ({c.size} codes used)", fontsize=12)
        ax.set_xlabel("code rank", fontsize=11)
        ax.set_ylabel("share of tokens", fontsize=11)
        ax.tick_params(labelsize=10)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(f"code usage (last validation pass, seed {seed})", fontsize=13)
    fig.tight_layout()
    return fig


def plot_all(out: Path, rows_by_run: dict[tuple[str, int], list], variants: list[str], seed: int) -> list[Path]:
    """OUT/code_usage.png, entropy.png and accuracy.png of the runs of ``seed``; the paths written."""
    plt = _pyplot()
    rows = {v: rows_by_run[(v, seed)] for v in variants}
    written = []
    for name, fig in (("code_usage.png", usage_figure(rows, seed)),
                      ("entropy.png", curves_figure(rows, ENTROPY_PANELS)),
                      ("accuracy.png", curves_figure(rows, ACCURACY_PANELS))):
        _save(fig, Path(out) / name)
        plt.close(fig)
        written.append(Path(out) / name)
    return written
