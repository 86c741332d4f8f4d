"""PNG figures of ``analyze`` and ``tune-filter`` (matplotlib, Agg backend, atomic writes)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from motion_data.common.atomic import atomic_path
from motion_data.build import stats as S


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike):
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        fig.clf()


def plot_analysis(result: dict, score_before: np.ndarray, score_after: np.ndarray, metric: str, threshold: float,
                  W: int, path, title: str = ""):
    """Label heatmaps on the W x W window (log10 share) before/after, and the score histogram."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    shares = []
    for key in ("before", "after"):
        cc = np.asarray(result[key]["class_counts"], np.float64).reshape(W, W)
        tot = cc.sum()
        shares.append(np.log10(np.where(cc > 0, cc / max(tot, 1.0), np.nan)))
    finite = np.concatenate([s[np.isfinite(s)] for s in shares]) if any(np.isfinite(s).any() for s in shares) \
        else np.array([-6.0, 0.0])
    vmin, vmax = float(finite.min()), 0.0
    c = W // 2
    for ax, key, sh in zip(axes[:2], ("before", "after"), shares):
        f = result[key]
        im = ax.imshow(sh, cmap="viridis", vmin=vmin, vmax=vmax, origin="upper",
                       extent=(-c - 0.5, c + 0.5, c + 0.5, -c - 0.5))
        ax.set_title(f"{key}: center {f['center_prop']:.3f}, perplexity {f['perplexity_ratio']:.3f}\n"
                     f"dynamic points {f['dynamic_point_ratio']:.3f}", fontsize=9)
        ax.set_xlabel("dx (ref px)")
        ax.set_ylabel("dy (ref px)")
        fig.colorbar(im, ax=ax, label="log10 label share", shrink=0.9)
    ax = axes[2]
    edges = S.HIST_EDGES.astype(np.float64)
    centres = np.append(edges[:-1] + S.HIST_BIN_WIDTH / 2, edges[-1] + S.HIST_BIN_WIDTH / 2)
    ax.fill_between(centres, np.maximum(score_before, 0.5), 0.5, step="mid", color="tab:blue", alpha=0.35,
                    label="before (all points)")
    ax.step(centres, np.maximum(score_after, 0.5), where="mid", color="tab:orange", label="after (kept points)")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel(f"per-point {metric} of ||v_norm|| (last bin: >= {edges[-1]:g})")
    ax.set_ylabel("points")
    ax.set_title("speed histogram", fontsize=9)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_tune(rows, targets, recommended: int | None, path, title: str = ""):
    """dynamic_point_ratio, center_prop, perplexity_ratio against the threshold, one line per metric."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True, layout="constrained")
    metrics = list(dict.fromkeys(r.metric for r in rows))
    spec = [("dynamic_point_ratio", targets.dynamic), ("center_prop", (None, targets.max_center)),
            ("perplexity_ratio", (targets.min_perplexity, None))]
    for ax, (key, band) in zip(axes, spec):
        for m in metrics:
            rs = [r for r in rows if r.metric == m]
            ax.plot([r.threshold for r in rs], [getattr(r, key) for r in rs], marker=".", ms=3, label=m)
        if band is not None:
            lo, hi = band
            if lo is not None:
                ax.axhline(lo, color="g", ls=":", lw=1)
            if hi is not None:
                ax.axhline(hi, color="g", ls=":", lw=1)
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color="g", alpha=0.08)
        if recommended is not None:
            r = rows[recommended]
            ax.plot([r.threshold], [getattr(r, key)], marker="*", color="r", ms=12, ls="none",
                    label=f"recommended {r.metric}@{r.threshold:g}")
        ax.set_xlabel("threshold (||v_norm||)")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
