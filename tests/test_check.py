"""Acceptance gates: definitions evaluated on hand-made metrics."""
import json

import pytest

from tokenizer_train import check


def _run(tmp_path, name, unique, ent, ppl, acc, nc, epochs=30, steps_per_epoch=5, usage=None):
    rows = []
    step = 0
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            f = (step + 1) / (epochs * steps_per_epoch)
            rows.append({"step": step, "epoch": e, "train/unique_codes_step": unique(f),
                         "train/entropy_norm_step": ent(f), "train/perplexity_step": ppl(f)})
            step += 1
        rows.append({"step": step, "epoch": e, "train/acc_epoch": acc, "val/acc_epoch": acc,
                     "val/epe_px_epoch": 1.0 - nc, "val/acc_noncenter_epoch": nc})
    rows.append({"step": step, "epoch": epochs - 1, "train/code_usage_counts": usage or [100] + [0] * 9})
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_multimodal_definition():
    assert check.is_multimodal([30, 30, 30, 10])[0]
    assert not check.is_multimodal([97, 1, 1, 1])[0]  # collapsed
    assert not check.is_multimodal([60, 20, 20])[0]  # top code above 50%
    assert not check.is_multimodal([50, 50, 0, 0])[0]  # only two modes
    assert not check.is_multimodal([0, 0])[0]
    assert not check.is_multimodal([45, 45, 5, 5])[0]  # two states: exp(H) ~ 2.6
    # a healthy spread: 120 codes, none near 2% of the tokens
    ok, eff, top = check.is_multimodal([2] * 120 + [0] * 1800)
    assert ok and eff == pytest.approx(120) and top == pytest.approx(1 / 120)


def test_collapsed_run_fails_and_healthy_run_passes(tmp_path, capsys):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)
    good = _run(tmp_path, "good", lambda f: 4 + 60 * f, lambda f: 0.1 + 0.5 * f, lambda f: 2 + 40 * f, 0.59, 0.4,
                usage=[20, 20, 20, 20, 20])
    gb = check.evaluate(check.read_metrics(base), check.read_metrics(base))
    assert not any(g.passed for g in gb if g.name.startswith(("unique", "entropy", "code usage", "val non")))
    gg = check.evaluate(check.read_metrics(good), check.read_metrics(base))
    assert all(g.passed for g in gg), check.format_table(gg)

    class A:
        run, baseline, json = str(good), str(base), str(tmp_path / "g.json")
    assert check.run(A) == 0
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is True
    assert "hint: python -m tokenizer_train frontier" not in capsys.readouterr().out
    A.run = str(base)
    assert check.run(A) == 1
    assert f"hint: python -m tokenizer_train frontier --run {base}" in capsys.readouterr().out  # val gates fail


def test_accuracy_drop_fails_gate(tmp_path):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)
    worse = _run(tmp_path, "worse", lambda f: 40, lambda f: 0.5, lambda f: 30, 0.55, 0.4, usage=[1] * 10)
    g = {x.name: x for x in check.evaluate(check.read_metrics(worse), check.read_metrics(base))}
    assert not g["acc_epoch vs baseline@10"].passed
    assert not g["unique_codes rising"].passed  # flat at 40


def test_short_run_is_marked_on_30_epoch_gates(tmp_path):
    r = _run(tmp_path, "short", lambda f: 4 + 60 * f, lambda f: 0.1 + 0.5 * f, lambda f: 2 + 40 * f, 0.6, 0.4, epochs=5,
             usage=[1] * 10)
    g = {x.name: x for x in check.evaluate(check.read_metrics(r))}
    assert "run has 5 epochs < 30" in g["unique_codes@30"].note


def test_missing_metrics_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        check.read_metrics(tmp_path)


def test_multimodal_reads_the_trainers_global_histogram(tmp_path):
    """The trainer logs per-code counts as train/code_usage_hist(_global); the all-rank one wins."""
    r = _run(tmp_path, "g", lambda f: 40, lambda f: 0.5, lambda f: 30, 0.6, 0.4, epochs=2)
    rows = check.read_metrics(r)
    rows = [x for x in rows if "train/code_usage_counts" not in x]
    rows.append({"step": 999, "epoch": 1, "train/code_usage_hist": [100, 0, 0],
                 "train/code_usage_hist_global": [30, 30, 20, 20]})
    g = {x.name: x for x in check.evaluate(rows)}
    assert g["code usage multi-modal"].passed
    rows[-1].pop("train/code_usage_hist_global")
    g = {x.name: x for x in check.evaluate(rows)}
    assert not g["code usage multi-modal"].passed  # this rank's collapsed counts


def test_val_gate_tolerates_no_obvious_degradation_only(tmp_path):
    """EPE within 2% of the baseline's passes ("no obvious degradation"); 5% worse fails."""
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)  # epe 1.0

    def gate(name, nc):
        r = _run(tmp_path, name, lambda f: 40 * f + 1, lambda f: 0.5, lambda f: 30, 0.60, nc, usage=[1] * 10)
        g = {x.name: x for x in check.evaluate(check.read_metrics(r), check.read_metrics(base))}
        return g["val not worse than baseline"].passed

    assert gate("slightly", -0.015)  # epe 1.015
    assert not gate("clearly", -0.05)  # epe 1.05


def test_val_gates_read_one_epoch_not_each_metrics_best(tmp_path):
    """An early epoch predicting one motion class everywhere (high non-centre accuracy, low
    accuracy) must not combine with other epochs' accuracy: the last epoch is what counts."""
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.05)
    r = _run(tmp_path, "mixed", lambda f: 40 * f + 1, lambda f: 0.5, lambda f: 30, 0.60, 0.15, usage=[1] * 10)
    rows = check.read_metrics(r)
    first = next(x for x in rows if "val/acc_noncenter_epoch" in x)
    first["val/acc_noncenter_epoch"], first["val/acc_epoch"] = 0.37, 0.16  # the all-motion epoch
    g = {x.name: x for x in check.evaluate(rows, check.read_metrics(base))}
    assert not g["val non-centre acc >= baseline + 0.25"].passed
    assert g["val non-centre acc >= baseline + 0.25"].value == 0.15
    assert g["val not worse than baseline"].passed
