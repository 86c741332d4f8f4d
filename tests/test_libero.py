"""build-shards + analyze on real LIBERO tracks (three rollouts copied from the shared
LIBERO set into tests/data/libero/) against an independent numpy computation written here
straight from the raw .npz arrays (docs/DESIGN.md "Units and labels", "Dataset figures")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocess.__main__ import main

DATA = Path(__file__).parent / "data" / "libero"
FILES = ("libero_90_0_0.npz", "libero_object_0_0.npz", "libero_spatial_0_0.npz")
W, REF, THR, MIN_KEEP = 15, 128, 0.04, 16


def independent_figures(rule: str) -> dict:
    """Figures before / after p95@0.04, min_keep 16, from the raw arrays with numpy only."""
    counts = {"before": np.zeros(W * W, np.int64), "after": np.zeros(W * W, np.int64)}
    kept = total = 0
    for name in FILES:
        with np.load(DATA / name) as z:
            tracks, vis, (H, Wd) = z["tracks"], z["visibility"], z["image_size"]
        assert tracks.shape[1] == 16  # one 16-frame window per sequence (grid re-initialised)
        p = (tracks.astype(np.float64) * np.array([REF / Wd, REF / H])).astype(np.float32)  # (B, 16, N, 2)
        valid = vis[:, 1:] & vis[:, :-1]
        if rule == "amplify":  # AMPLIFY: round(clip(p, 0, 127)) at both frames, then the difference
            q = np.rint(np.clip(p, 0, REF - 1))
            d = q[:, 1:] - q[:, :-1]
        else:
            d = np.rint(p[:, 1:] - p[:, :-1])
        col = np.clip(d[..., 0] + W // 2, 0, W - 1).astype(np.int64)
        row = np.clip(d[..., 1] + W // 2, 0, W - 1).astype(np.int64)
        lab = row * W + col
        speed = np.linalg.norm(np.clip((p[:, 1:] - p[:, :-1]) / ((W - 1) / 2), -1, 1), axis=-1)
        B, S, N = valid.shape
        for b in range(B):
            score = np.zeros(N, np.float32)
            for n in range(N):
                s = speed[b, valid[b, :, n], n]
                if s.size:
                    score[n] = np.float32(np.percentile(s.astype(np.float64), 95))
            keep = score >= np.float32(THR)
            if keep.sum() < MIN_KEEP:
                cand = [n for n in range(N) if valid[b, :, n].any()]
                cand.sort(key=lambda n: (-score[n], n))
                keep = np.zeros(N, bool)
                keep[cand[:MIN_KEEP]] = True
            counts["before"] += np.bincount(lab[b][valid[b]], minlength=W * W)
            counts["after"] += np.bincount(lab[b][valid[b] & keep[None]], minlength=W * W)
            kept += int(keep.sum())
            total += N
    centre = (W // 2) * W + W // 2
    return {k: {"class_counts": c.tolist(), "center_prop": c[centre] / c.sum(),
                "dynamic_point_ratio": (kept if k == "after" else total) / total} for k, c in counts.items()}


@pytest.mark.parametrize("rule", ["amplify", "velocity"])
def test_libero_figures_equal_an_independent_numpy_computation(tmp_path, capsys, rule):
    out = tmp_path / "b"
    assert main(["build-shards", "--input", *[str(DATA / f) for f in FILES], "--out", str(out), "--label-rule", rule,
                 "--no-progress"]) == 0
    capsys.readouterr()
    ref = independent_figures(rule)
    for extra in ([], ["--exact", "--no-progress"]):
        assert main(["analyze", str(out), "--filter", f"p95@{THR}", "--min-keep", str(MIN_KEEP), "--json", "-",
                     *extra]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["label_rule"] == rule
        for key in ("before", "after"):
            assert got[key]["class_counts"] == ref[key]["class_counts"], (key, extra)
            assert got[key]["center_prop"] == pytest.approx(ref[key]["center_prop"], abs=1e-12)
            assert got[key]["dynamic_point_ratio"] == pytest.approx(ref[key]["dynamic_point_ratio"], abs=1e-12)
    # the figures are those of the target domain: mostly static before, the filter does real work
    assert ref["before"]["center_prop"] > 0.9 and ref["after"]["center_prop"] < 0.5
    assert 0.05 < ref["after"]["dynamic_point_ratio"] < 0.2
