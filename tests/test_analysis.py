"""analyze / tune-filter: histogram answers vs brute force, exact pass vs fast, the commands."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from motion_data.inspect import analysis as A
from motion_data.build.folder import BuildDir
from motion_data.common import labels as L
from motion_data.build import shards
from conftest import class_histograms, point_stats
from motion_data.build import stats as S
from motion_data.common import static_filter as SF
from motion_data.build.store import store_attrs
from preprocess.__main__ import main
from motion_data.common.errors import DataError

W = 15
BW = S.HIST_BIN_WIDTH


def synth(C, N, T, seed):
    """Positions (C, T, N, 2) and visibility: mostly static points with a few movers and
    occlusion, so filters change the figures."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=(C, 1, N, 1), p=[0.55, 0.2, 0.2, 0.05])
    scale = np.choose(kind, [0.03, 0.25, 1.5, 9.0])
    vel = rng.standard_normal((C, T - 1, N, 2)) * scale
    start = rng.uniform(0, 128, (C, 1, N, 2))
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    vis = rng.random((C, T, N)) < 0.92
    vis[:, :, 0] = False  # a never-visible point in every clip
    vis[0] = False  # and a never-visible clip
    return pos, vis


def make_build(root: Path, C=30, N=24, T=16, seed=0, shard_sizes=None, rule="amplify"):
    """A build folder in the binding layout, written with zarr/pyarrow directly; labels by ``rule``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(exist_ok=True)
    shard_sizes = shard_sizes or (C // 2, C - C // 2)
    pos, vis = synth(C, N, T, seed)
    st = point_stats(pos, vis, W, 128, rule)
    src = "tracks/demo.npz"
    h = hashlib.sha1(src.encode()).hexdigest()[:8]
    ids = [f"demo-{h}-s0000-f{i * 8:06d}" for i in range(C)]
    man = {"shard": [], "offset": [], "size": [], "checksum": []}
    i0 = 0
    for k, n in enumerate(shard_sizes):
        rel = f"shards/{shards.shard_name(k)}"
        samples = [shards.encode_sample(ids[i], pos[i], vis[i], np.stack([st[m][i] for m in SF.METRICS]),
                                        {"source": src, "sequence": 0, "start_frame": i * 8})
                   for i in range(i0, i0 + n)]
        for _, off, size in shards.write_shard(root / rel, samples):
            man["shard"].append(rel)
            man["offset"].append(off)
            man["size"].append(size)
        man["checksum"] += [shards.sample_checksum(x) for x in samples]
        i0 += n
    g = zarr.open_group(str(root / "stats.zarr"), mode="w", zarr_format=3)
    for name in (*SF.METRICS, "center_count", "valid_count"):
        g.create_array(f"stats/{name}", data=st[name], chunks=(7, N))  # chunks not aligned to the pass
    for m in SF.METRICS:
        points, topk = class_histograms(pos, vis, m, W, 128, rule)
        g.create_array(f"hist/{m}/points", data=points)
        g.create_array(f"hist/{m}/topk", data=topk)
    g.create_array("label_ring", data=L.ring_map(W))
    g.attrs.update(store_attrs(W=W, ref_size=128, T=T, N=N, n_clips=C, label_rule=rule,
                               build_filter={"metric": "p95", "threshold": 0.04, "min_keep": 16}))
    pq.write_table(pa.table({
        "clip_id": ids, "source": [src] * C, "sequence": np.zeros(C, np.int64),
        "start_frame": np.arange(C, dtype=np.int64) * 8, "shard": man["shard"],
        "offset": np.asarray(man["offset"], np.int64), "size": np.asarray(man["size"], np.int64),
        "dynamic_ratio": np.ones(C, np.float32), "center_share": np.zeros(C, np.float32),
        "mean_speed": np.zeros(C, np.float32),
        "visible_fraction": L.step_valid(vis).mean(axis=(1, 2)).astype(np.float32),
        "checksum": np.asarray(man["checksum"], np.int64), "split_group": [src] * C,
    }), root / "manifest.parquet")
    return root, pos, vis, st


def brute(pos, vis, st, metric, t, k, rule="amplify"):
    """Kept class counts + kept points via keep_mask (itself checked in test_stats.py)."""
    keep = S.keep_mask(st[metric], st["valid_count"], t, k)
    lab = L.labels_from_positions(pos, W, 128, rule)
    return np.append(np.bincount(lab[L.step_valid(vis) & keep[:, None, :]], minlength=W * W), keep.sum())


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("build") / "out")


# ---------------------------------------------------------------- pure functions
def test_parse_range_inclusive_and_on_bin_edges():
    v = A.parse_range("0.01:0.20:0.005")
    assert len(v) == 39 and v[0] == 0.01 and v[-1] == 0.2
    for t in v:  # every value is a bin edge, so the fast answer is exact there
        assert abs(S.threshold_bin(t) * BW - t) < 1e-12
    assert A.parse_range("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert A.parse_range("0.04") == [0.04]
    assert A.parse_range("0.03, 0.05") == [0.03, 0.05]
    for bad in ("0.2:0.1:0.01", "0.1:0.2:0", "a:b:c", "", "-0.1"):
        with pytest.raises(ValueError, match="threshold range"):
            A.parse_range(bad)
    assert A.parse_interval("0.45:0.6") == (0.45, 0.6) and A.parse_interval("none") is None
    with pytest.raises(ValueError):
        A.parse_interval("0.6:0.45")


@pytest.mark.parametrize("k", [0, 1, 16, S.HIST_RANK_MAX])
def test_sweep_counts_equal_filtered_counts_from_hist(build, k):
    _, pos, vis, st = build
    points, topk = class_histograms(pos, vis, "mean", W)
    ts = [0.0, 0.01, 0.0137, 0.04, 0.2, 0.6]
    got = A.sweep_counts_from_hist(points, topk, ts, k)
    for t, row in zip(ts, got):
        cc, kept = S.filtered_counts_from_hist(points, topk, t, k)
        np.testing.assert_array_equal(row, np.append(cc, kept))
    with pytest.raises(ValueError, match="--exact"):
        A.sweep_counts_from_hist(points, topk, ts, S.HIST_RANK_MAX + 1)


@pytest.mark.parametrize("k", [0, 3, 16, 24, 40])
def test_exact_sweep_equals_brute_force(build, k):
    _, pos, vis, st = build
    ts = [0.05, 0.0, 0.0137, 0.05, 0.3, 1.5, 0.004]  # unsorted, repeated, above every score
    acc = A.ExactSweep(SF.METRICS, ts, k, W)
    for lo in range(0, len(pos), 11):  # chunks need not align with anything
        sl = slice(lo, lo + 11)
        acc.add({m: st[m][sl] for m in SF.METRICS}, st["valid_count"][sl], L.labels_from_positions(pos[sl], W),
                L.step_valid(vis[sl]))
    for m in SF.METRICS:
        c = acc.counts(m)
        for j, t in enumerate(ts):
            np.testing.assert_array_equal(c[j], brute(pos, vis, st, m, t, k), err_msg=f"{m}@{t} k={k}")


def test_before_after_matches_brute_force(build):
    _, pos, vis, st = build
    points, topk = class_histograms(pos, vis, "p95", W)
    res = A.before_after(points, topk, 0.04, 16, W)
    lab = L.labels_from_positions(pos, W)
    before = np.bincount(lab[L.step_valid(vis)], minlength=W * W)
    assert res["before"]["class_counts"] == before.tolist()
    assert res["before"]["dynamic_point_ratio"] == 1.0
    assert res["before"]["center_prop"] == pytest.approx(before[L.center_class(W)] / before.sum())
    after = brute(pos, vis, st, "p95", 0.04, 16)
    assert res["after"]["class_counts"] == after[:-1].tolist()
    assert res["after"]["dynamic_point_ratio"] == pytest.approx(after[-1] / st["p95"].size)
    assert res["after"]["perplexity_ratio"] == pytest.approx(L.perplexity_ratio(after[:-1]))
    # the filter does what it is for on this data
    assert res["after"]["center_prop"] < res["before"]["center_prop"]
    sb, sa = A.score_hist_before_after(points, topk, 0.04, 16)
    assert sb.sum() == st["p95"].size and sa.sum() == after[-1]


def _row(t, d, c, p, targets):
    r = A.TuneRow("p95", t, 16, d, c, p)
    r.meets_targets = targets.shortfall(r) == 0
    return r


def test_recommend_rule():
    tg = A.Targets((0.45, 0.60), 0.55, 0.10)
    rows = [_row(0.01, 0.70, 0.50, 0.20, tg), _row(0.02, 0.55, 0.50, 0.12, tg),
            _row(0.03, 0.50, 0.45, 0.15, tg), _row(0.04, 0.40, 0.30, 0.30, tg)]
    assert [r.meets_targets for r in rows] == [False, True, True, False]
    i, why = A.recommend(rows, tg)
    assert i == 2 and "meets all targets" in why
    # no row meets: smallest total shortfall wins (0.05 + 0.02 < 0.10)
    rows = [_row(0.01, 0.70, 0.50, 0.20, tg), _row(0.02, 0.40, 0.57, 0.15, tg), _row(0.03, 0.30, 0.50, 0.30, tg)]
    assert not any(r.meets_targets for r in rows)
    i, why = A.recommend(rows, tg)
    assert i == 1 and "closest" in why and "0.0700" in why
    # without targets every row meets them, so the highest perplexity wins
    none = A.Targets(None, None, None)
    assert A.recommend([_row(0.01, 0.7, 0.5, 0.2, none), _row(0.02, 0.6, 0.6, 0.25, none)], none)[0] == 1


# ---------------------------------------------------------------- exact pass vs fast answer
def test_exact_pass_agrees_with_histograms_within_one_bin(build):
    root, pos, vis, st = build
    hists = BuildDir(root).histograms(SF.METRICS)
    edges = [b * BW for b in (0, 2, 4, 9, 16, 23, 40, 80)]
    between = [0.0101, 0.04 + 0.4 * BW, 0.0555, 0.1337]
    for k in (0, 16):
        acc = A.exact_from_build(root, SF.METRICS, edges + between, k, chunk=8, progress=False)
        for m in SF.METRICS:
            exact = acc.counts(m)
            points, topk = hists[m]
            fast = A.sweep_counts_from_hist(points, topk, edges, k)
            np.testing.assert_array_equal(exact[:len(edges)], fast, err_msg=f"{m} k={k} at bin edges")
            for j, t in enumerate(between):
                e = exact[len(edges) + j]
                lo_edge = S.threshold_bin(t) * BW
                hi_t, lo_t = A.sweep_counts_from_hist(points, topk, [lo_edge + BW, lo_edge], k)
                assert (hi_t <= e).all() and (e <= lo_t).all(), f"{m}@{t} k={k}"
                np.testing.assert_array_equal(e, brute(pos, vis, st, m, t, k))
                # so dynamic_point_ratio lies between the fast values at t - bw and t + bw
                fd = [A.sweep_counts_from_hist(points, topk, [x], k)[0, -1] for x in (t + BW, t - BW)]
                assert fd[0] <= e[-1] <= fd[1]


def test_exact_pass_names_a_damaged_shard(build, tmp_path):
    root = make_build(tmp_path / "b", C=6, N=8, shard_sizes=(6,))[0]
    p = root / "shards" / shards.shard_name(0)
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(DataError, match="shard-000000.tar"):
        A.exact_from_build(root, ["p95"], [0.04], 4, progress=False)


# ---------------------------------------------------------------- the commands
def test_analyze_command(build, tmp_path, capsys):
    root, pos, vis, st = build
    jf, pf = tmp_path / "a.json", tmp_path / "a.png"
    assert main(["analyze", str(root), "--filter", "max@0.05", "--min-keep", "5", "--json", str(jf),
                 "--plot", str(pf)]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "center_prop" in out
    res = json.loads(jf.read_text())
    for key in ("before", "after"):
        assert set(A.FIGURE_KEYS) <= set(res[key])
        assert len(res[key]["class_counts"]) == W * W
    after = brute(pos, vis, st, "max", 0.05, 5)
    assert res["after"]["class_counts"] == after[:-1].tolist()
    assert res["after"]["dynamic_point_ratio"] == pytest.approx(after[-1] / st["max"].size)
    assert pf.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --exact gives the same figures at a bin edge, and handles min_keep beyond the stored ranks
    assert main(["analyze", str(root), "--filter", "max@0.05", "--min-keep", "5", "--exact", "--no-progress",
                 "--json", "-"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["before"] == res["before"] and ex["after"] == res["after"] and ex["source"] == "exact"
    assert main(["analyze", str(root), "--min-keep", "40", "--exact", "--no-progress", "--json", "-"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["after"]["class_counts"] == brute(pos, vis, st, "p95", 0.04, 40)[:-1].tolist()


def test_analyze_errors(build, tmp_path, capsys):
    root = build[0]
    assert main(["analyze", str(root), "--min-keep", "40"]) == 2
    err = capsys.readouterr().err
    assert "--exact" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "stats.zarr" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(root), "--filter", "speed@0.1"]) == 2
    assert "metric" in capsys.readouterr().err


def _read_csv(p):
    with open(p, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_tune_filter_command_fast_and_exact(build, tmp_path, capsys):
    root = build[0]
    cf, ef, pf = tmp_path / "t.csv", tmp_path / "e.csv", tmp_path / "t.png"
    args = ["tune-filter", str(root), "--metrics", "p95,mean,max", "--thresholds", "0.01:0.20:0.005",
            "--min-keep", "16"]
    assert main(args + ["--csv", str(cf), "--plot", str(pf)]) == 0
    out = capsys.readouterr().out
    head, rows = _read_csv(cf)
    assert head == ["metric", "threshold", "min_keep", "dynamic_point_ratio", "center_prop", "perplexity_ratio",
                    "meets_targets"]
    assert len(rows) == 3 * 39 and {r[0] for r in rows} == {"p95", "mean", "max"}
    assert out.count("<- recommended") == 1 and "recommended:" in out
    assert pf.read_bytes()[:4] == b"\x89PNG"
    # kept share falls as the threshold rises
    p95 = [float(r[3]) for r in rows if r[0] == "p95"]
    assert all(a >= b for a, b in zip(p95, p95[1:])) and p95[0] > p95[-1]
    assert main(args + ["--csv", str(ef), "--exact", "--no-progress"]) == 0
    out_exact = capsys.readouterr().out
    assert _read_csv(ef) == (head, rows)  # every threshold here is a bin edge
    rec = [o.split("recommended:")[1].splitlines()[0] for o in (out, out_exact)]
    assert rec[0] == rec[1]


def test_tune_filter_targets_and_errors(build, tmp_path, capsys):
    root = build[0]
    cf = tmp_path / "t.csv"
    assert main(["tune-filter", str(root), "--metrics", "mean", "--thresholds", "0.02,0.05", "--target-dynamic",
                 "none", "--max-center", "none", "--min-perplexity", "none", "--csv", str(cf)]) == 0
    _, rows = _read_csv(cf)
    assert [r[6] for r in rows] == ["true", "true"]
    assert "targets: none" in capsys.readouterr().out
    assert main(["tune-filter", str(root), "--min-perplexity", "0.99", "--csv", str(cf)]) == 0
    _, rows = _read_csv(cf)
    assert all(r[6] == "false" for r in rows)
    assert "no row meets all targets" in capsys.readouterr().out
    for bad, msg in ((["--min-keep", "33"], "--exact"), (["--metrics", "p95,speed"], "--metrics"),
                     (["--thresholds", "0.2:0.1:0.01"], "threshold range")):
        assert main(["tune-filter", str(root)] + bad) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_tune_plot_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["tune-filter", "--help"])
    out = capsys.readouterr().out
    for opt in ("--metrics", "--thresholds", "--min-keep", "--target-dynamic", "--max-center", "--min-perplexity",
                "--csv", "--plot", "--exact"):
        assert opt in out
    assert "highest perplexity_ratio" in out


def test_commands_on_a_real_build(tiny_build, tmp_path, capsys):
    """build-shards output (conftest.tiny_build): fast and exact answers agree at bin edges."""
    jf, ef = tmp_path / "a.json", tmp_path / "e.json"
    assert main(["analyze", str(tiny_build), "--json", str(jf)]) == 0
    assert main(["analyze", str(tiny_build), "--json", str(ef), "--exact", "--no-progress"]) == 0
    fast, exact = json.loads(jf.read_text()), json.loads(ef.read_text())
    assert fast["before"] == exact["before"] and fast["after"] == exact["after"]
    assert sum(fast["before"]["class_counts"]) > sum(fast["after"]["class_counts"]) > 0
    assert fast["after"]["center_prop"] < fast["before"]["center_prop"]
    cf, xf = tmp_path / "f.csv", tmp_path / "x.csv"
    args = ["tune-filter", str(tiny_build), "--thresholds", "0.0:0.1:0.0125", "--min-keep", "8"]
    assert main(args + ["--csv", str(cf)]) == 0
    assert main(args + ["--csv", str(xf), "--exact", "--no-progress"]) == 0
    assert _read_csv(cf) == _read_csv(xf)
    capsys.readouterr()


@pytest.mark.parametrize("rule", ["amplify", "velocity"])
def test_figures_follow_and_name_the_builds_label_rule(tmp_path, capsys, rule):
    """analyze / tune-filter (fast and exact) answer with the labels of the rule the build
    recorded, and say which rule that is."""
    root, pos, vis, st = make_build(tmp_path / rule, C=12, N=16, rule=rule)
    assert main(["analyze", str(root), "--json", "-", "--exact", "--no-progress"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["label_rule"] == rule
    assert ex["after"]["class_counts"] == brute(pos, vis, st, "p95", 0.04, 16, rule)[:-1].tolist()
    assert main(["analyze", str(root)]) == 0
    assert f"labels by the {rule} rule" in capsys.readouterr().out
    assert main(["tune-filter", str(root), "--thresholds", "0.04"]) == 0
    assert f"labels by the {rule} rule" in capsys.readouterr().out
    other = "velocity" if rule == "amplify" else "amplify"
    assert brute(pos, vis, st, "p95", 0, 0, rule).tolist() != brute(pos, vis, st, "p95", 0, 0, other).tolist()
