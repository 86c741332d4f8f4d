"""Ablation runner: variants files, config resolution, results table, resume without rerun."""
import csv
import json

import pytest

from tokenizer_train.experiments import ablate as AB
from tokenizer_train.experiments import variants as V
from tokenizer_train.__main__ import main
from motion_data.common.errors import SettingError

TINY = {"model.hidden_dim": 16, "model.num_layers": 1, "model.num_heads": 2, "training.batch_size": 8,
        "training.log_interval": 1, "data.val_split": 0.25, "training.device": "cpu"}


def test_default_variants_resolve_against_base():
    variants = V.load_variants(V.DEFAULT_VARIANTS)
    seed_stages = {"entropy", "balanced", "ring_decay", "focal", "layernorm", "rmsnorm", "tanh_scale", "noise",
                   "sampler", "augment", "recommended"}
    assert seed_stages <= set(variants)
    base = V.resolve(V.CONFIG_DIR / "base.yaml", {})
    for name, ov in variants.items():
        assert ov, name
        cfg = V.resolve(V.CONFIG_DIR / "base.yaml", ov, epochs=3, seed=1)
        assert cfg != base, name  # every variant changes something
        assert cfg.training.epochs == 3 and cfg.training.seed == 1
    assert V.resolve(V.CONFIG_DIR / "base.yaml", variants["sampler"]).data.sampler.method == "dynamic_ratio"


def test_recommended_config_is_self_contained():
    """configs/recommended.yaml alone is the recommendation, the seed's static filter included;
    the baseline is base.yaml as it is, unfiltered."""
    from motion_data.common.static_filter import DEFAULT_FILTER
    from tokenizer_train.common.config import load_config

    rec = load_config(V.CONFIG_DIR / "recommended.yaml").data.static_filter
    assert (rec.enable, rec.metric, rec.threshold, rec.min_keep) == (True, "p95", 0.04, 16)
    assert (rec.enable, rec.metric, rec.threshold, rec.min_keep) == (DEFAULT_FILTER.enable, DEFAULT_FILTER.metric,
                                                                     DEFAULT_FILTER.threshold, DEFAULT_FILTER.min_keep)
    assert not load_config(V.CONFIG_DIR / "base.yaml").data.static_filter.enable
    v = V.load_variants(V.DEFAULT_VARIANTS)["recommended"]
    assert V.resolve(V.CONFIG_DIR / "base.yaml", v).data.static_filter.enable


def test_variants_file_include_order_and_errors(tmp_path):
    (tmp_path / "rec.yaml").write_text("training:\n  focal:\n    enabled: true\n    gamma: 1.0\n")
    (tmp_path / "v.yaml").write_text("combo:\n  include: rec.yaml\n  training.focal.gamma: 3.0\n"
                                     "plain:\n  training.code_entropy_weight: 0.1\n")
    v = V.load_variants(tmp_path / "v.yaml")
    assert v["combo"] == {"training.focal.enabled": True, "training.focal.gamma": 3.0}
    # variant overrides first, then the common --set
    cfg = V.resolve(None, v["combo"], {"training.focal.gamma": 0.5})
    assert cfg.training.focal.enabled and cfg.training.focal.gamma == 0.5
    (tmp_path / "bad.yaml").write_text("baseline:\n  training.epochs: 2\n")
    with pytest.raises(SettingError, match="reserved"):
        V.load_variants(tmp_path / "bad.yaml")
    with pytest.raises(SettingError, match="training.focal.gama"):
        V.resolve(None, {"training.focal.gama": 1.0})


def test_ablate_writes_table_and_does_not_rerun(tiny_build, tmp_path, capsys):
    (tmp_path / "v.yaml").write_text("entropy:\n  training.code_entropy_weight: 0.1\n"
                                     "ring:\n  training.class_weighting.method: ring_decay\n"
                                     "  training.class_weighting.center_gamma: 0.2\n")
    out = tmp_path / "abl"
    argv = ["ablate", "--data", str(tiny_build), "--out", str(out), "--variants", str(tmp_path / "v.yaml"),
            "--epochs", "1", "--seeds", "0", "--no-progress"] + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["baseline", "entropy", "ring"]
    assert set(AB.csv_columns()) == set(rows[0])
    assert AB.csv_columns()[2] == "code_info_bits"  # code information is the first column
    for col in ("unique_codes", "entropy_norm", "perplexity", "acc", "acc_noncenter", "epe_px", "zero_code_share",
                "code_info_bits", "ce_bits", "auc_moving", "epe_zero_px"):
        assert rows[0][col] != "nan" and float(rows[0][f"{col}_delta"]) == 0.0
        assert rows[1][col] != "nan"
    assert 0 <= float(rows[0]["acc"]) <= 1 and float(rows[0]["epe_px"]) > 0
    # the frontier column: computed from each run's last.pt, cached next to it
    fr = json.loads((out / "runs" / "ring" / "seed0" / "frontier.json").read_text())
    best = fr["summary"]["best_noncenter_within_tol"]
    if best is None:  # no offset keeps accuracy within the tolerance
        assert rows[2]["noncentre_at_acc_tol"] == "nan"
    else:
        assert float(rows[2]["noncentre_at_acc_tol"]) == pytest.approx(best, rel=1e-5)
    assert 0 <= float(rows[0]["noncentre_at_acc_tol"]) <= 1
    assert int(rows[1]["gates_total"]) > 0 and rows[0]["gates_total"] == "0"
    md = (out / "results.md").read_text()
    assert "| baseline |" in md and "| ring |" in md and "val non-centre acc" in md
    assert md.splitlines()[2].startswith("| variant | code information (bits/label) | unique codes |")
    assert float(rows[0]["epe_zero_px"]) > 0 and 0 <= float(rows[0]["auc_moving"]) <= 1
    assert float(rows[0]["ce_bits"]) > 0 and float(rows[0]["code_info_bits"]) <= 3.17
    for png in ("code_usage.png", "entropy.png", "accuracy.png"):
        assert (out / png).stat().st_size > 1000
    # the plots of this 1-epoch ablation again, warnings as errors: one validation point per run shows
    import warnings
    from tokenizer_train.experiments import ablate_plots as AP
    from tokenizer_train.evaluate import check as C

    rows_by_run = {(v, 0): C.read_metrics(out / "runs" / v / "seed0") for v in ("baseline", "entropy", "ring")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AP.plot_all(tmp_path, rows_by_run, ["baseline", "entropy", "ring"], 0)
        fig = AP.curves_figure({v: rows_by_run[(v, 0)] for v in ("baseline", "entropy", "ring")}, AP.ACCURACY_PANELS)
    for ax in fig.axes:  # one validation epoch: a single point per run, drawn as a marker
        assert len(ax.lines) == 3 and len(ax.get_legend().get_texts()) == 3
        assert all(len(line.get_xdata()) == 1 and line.get_marker() != "None" for line in ax.lines)
    for v in ("baseline", "entropy", "ring"):
        assert (out / "runs" / v / "seed0" / "done.json").exists()
        assert list((out / "runs" / v / "seed0").glob("events.out.tfevents.*"))
    assert "| entropy |" in capsys.readouterr().out

    # second call: every run is finished, the trainer is never called, same table
    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    variants = V.load_variants(tmp_path / "v.yaml")
    table = AB.ablate(AB.RunGrid(None, variants, [0], TINY, 1), tiny_build, out, progress=False, plots=False,
                      train_fn=boom)
    assert [r["variant"] for r in table] == ["baseline", "entropy", "ring"]
    assert table[1]["acc"] == pytest.approx(float(rows[1]["acc"]), rel=1e-5)
    assert json.loads((out / "status.json").read_text()) == {f"{v}/seed0": "done" for v in ("baseline", "entropy", "ring")}

    # a finished run with a different config is refused, not silently reused
    with pytest.raises(ValueError, match="different config"):
        AB.ablate(AB.RunGrid(None, variants, [0], TINY, 2), tiny_build, out, progress=False, plots=False, train_fn=boom)


def test_aggregate_mean_spread_and_deltas():
    per = {("baseline", 0): {c: 1.0 for c, _, _ in AB.METRICS}, ("baseline", 1): {c: 3.0 for c, _, _ in AB.METRICS},
           ("v", 0): {c: 2.0 for c, _, _ in AB.METRICS}, ("v", 1): {c: 6.0 for c, _, _ in AB.METRICS}}
    t = AB.aggregate(per, {("v", 0): [], ("v", 1): []}, ["baseline", "v"], [0, 1])
    assert t[1]["acc"] == 4.0 and t[1]["acc_std"] == 2.0
    assert t[1]["acc_delta"] == 2.0 and t[1]["acc_delta_std"] == 1.0  # deltas 1 and 3
    assert t[0]["acc_delta"] == 0.0


def test_cli_errors(tiny_build, tmp_path, capsys):
    assert main(["ablate", "--data", str(tiny_build), "--out", str(tmp_path / "o"), "--seeds", "0,0"]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["ablate", "--data", str(tiny_build), "--out", str(tmp_path / "o"), "--only", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert main(["ablate", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_only_baseline_is_a_valid_selection(tiny_build, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(AB, "ablate", lambda grid, data, out, *a, **k: seen.setdefault("v", grid.variants))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.md").write_text("table\n")
    argv = ["ablate", "--data", str(tiny_build), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv + ["--only", "baseline"]) == 0 and seen.pop("v") == {}
    assert main(argv + ["--only", "baseline,entropy"]) == 0 and list(seen.pop("v")) == ["entropy"]


def test_run_with_only_last_prev_resumes_not_wiped(tmp_path):
    """A kill that tore last.pt leaves last.prev.pt: the run resumes from it, nothing is deleted."""
    spec = AB.plan(None, {}, tmp_path, [0], TINY, 1)[0]
    spec.dir.mkdir(parents=True)
    (spec.dir / "last.prev.pt").write_bytes(b"x")
    (spec.dir / "metrics.jsonl").write_text("{}\n")
    calls = []
    assert AB.run_one(spec, tmp_path, train_fn=lambda cfg, data, out, resume, progress, overwrite: calls.append((resume, overwrite)),
                      progress=False) == "resumed"
    assert calls == [(True, False)] and (spec.dir / "last.prev.pt").exists() and (spec.dir / "metrics.jsonl").exists()


def test_summarize_reads_a_null_last_value_as_nan():
    """The logger writes a non-finite value (an AUC of a split without moving labels) as null."""
    import math

    rows = [{"step": 1, "epoch": 0, "val/auc_moving_epoch": None, "val/code_info_bits_epoch": 0.5}]
    out = AB.summarize(rows)
    assert math.isnan(out["auc_moving"]) and out["code_info_bits"] == 0.5


def test_run_that_died_before_its_first_checkpoint_restarts_through_the_run_folder_rule(tiny_build, tmp_path):
    """No checkpoint: the run starts afresh; its stale rows go, a file that is not the run's stays
    (the run folder's rule, run_folder.check_fresh, instead of wiping the folder)."""
    from motion_data.common.errors import DataError

    spec = AB.plan(None, {}, tmp_path, [0], TINY, 1)[0]
    spec.dir.mkdir(parents=True)
    (spec.dir / "metrics.jsonl").write_text('{"step": 99, "train/loss_step": 1.0}\n')
    (spec.dir / "run.json").write_text("{}")
    assert AB.run_one(spec, tiny_build, progress=False) == "trained"
    steps = [json.loads(x)["step"] for x in (spec.dir / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps
    (spec.dir / "done.json").unlink()
    for p in spec.dir.glob("last*.pt"):
        p.unlink()
    (spec.dir / "notes.txt").write_text("mine")
    assert AB.run_one(spec, tiny_build, progress=False) == "trained"  # the run's files replaced
    assert (spec.dir / "notes.txt").read_text() == "mine"  # not the run's: kept (it was wiped before)
    # a folder holding only files that are not a run's is refused, not wiped
    other = AB.plan(None, {}, tmp_path / "o", [0], TINY, 1)[0]
    other.dir.mkdir(parents=True)
    (other.dir / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        AB.run_one(other, tiny_build, progress=False)
    assert (other.dir / "notes.txt").read_text() == "mine"


def test_a_figure_not_logged_reads_not_logged_and_is_never_replaced():
    """No validation split: the validation columns say "not logged" instead of showing the
    training figure under a validation heading."""
    rows = [{"step": 1, "epoch": 0, "train/acc_epoch": 0.7, "train/code_info_bits_step": 0.4,
             "train/unique_codes_step": 12, "train/entropy_norm_step": 0.5, "train/perplexity_step": 9.0}]
    out = AB.summarize(rows)
    assert out["acc"] is None and out["code_info_bits"] is None and out["unique_codes"] == 12
    out["noncentre_at_acc_tol"] = None  # frontier_summary without a validation split
    per = {("baseline", 0): out, ("v", 0): dict(out)}
    table = AB.aggregate(per, {("v", 0): []}, ["baseline", "v"], [0])
    md = AB.markdown(table)
    line = next(ln for ln in md.splitlines() if ln.startswith("| v |"))
    assert line.count("not logged") == sum(1 for c, _, how in AB.METRICS if how != "late") == 9
    assert "0.7" not in md and "0.40" not in md
