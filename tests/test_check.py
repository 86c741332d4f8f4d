"""Acceptance gates: definitions evaluated on hand-made metrics."""
import json

import pytest

from tokenizer_train.evaluate import check


def _run(tmp_path, name, unique, ent, ppl, acc, nc, epochs=30, steps_per_epoch=5, usage=None, info=None, ce=None):
    # code information and CE (bits/label) follow the non-centre accuracy unless given
    info = 2 * nc if info is None else info
    ce = 3.0 - 2 * nc if ce is None else ce
    rows = []
    step = 0
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            f = (step + 1) / (epochs * steps_per_epoch)
            rows.append({"step": step, "epoch": e, "train/unique_codes_step": unique(f),
                         "train/entropy_norm_step": ent(f), "train/perplexity_step": ppl(f)})
            step += 1
        rows.append({"step": step, "epoch": e, "train/acc_epoch": acc, "val/acc_epoch": acc,
                     "val/epe_px_epoch": 1.0 - nc, "val/acc_noncenter_epoch": nc,
                     "val/code_info_bits_epoch": info, "val/ce_bits_epoch": ce})
    rows.append({"step": step, "epoch": epochs - 1, "train/code_usage_hist_global": usage or [100] + [0] * 9})
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
        filtered_baseline = None
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


def _cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit 2 and return its one stderr line."""
    from tokenizer_train.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_run_not_a_run_and_damaged_metrics_are_one_line(tmp_path, capsys):
    err = _cli_error(["check", str(tmp_path / "nope")], capsys)
    assert f"{tmp_path / 'nope'}: no such folder" in err and "--out folder of python -m tokenizer_train train" in err
    (tmp_path / "plain").mkdir()
    err = _cli_error(["check", str(tmp_path / "plain")], capsys)
    assert "metrics.jsonl: not found" in err and "not a training run folder" in err
    (tmp_path / "abl" / "runs").mkdir(parents=True)  # an ablate output: point at its runs
    assert "runs" + "/VARIANT/seedK" in _cli_error(["check", str(tmp_path / "abl")], capsys)
    good = _healthy(tmp_path, "good")
    bad = tmp_path / "garbage"
    bad.mkdir()
    lines = (good / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join(lines[:3] + ["xx garbage"] + lines[3:]) + "\n")
    err = _cli_error(["check", str(bad)], capsys)
    assert f"{bad / 'metrics.jsonl'}:4: not a JSON object" in err
    (bad / "metrics.jsonl").write_text(lines[0] + "\n" + "[1, 2]\n")  # a complete line that is no row
    assert ":2: not a JSON object" in _cli_error(["check", str(bad)], capsys)
    (bad / "metrics.jsonl").write_text("")
    assert "no metrics logged yet" in _cli_error(["check", str(bad)], capsys)
    err = _cli_error(["check", str(good), "--baseline", str(tmp_path / "nobase")], capsys)
    assert str(tmp_path / "nobase") in err


def test_torn_last_line_is_dropped_with_one_warning(tmp_path, capsys):
    """A run killed mid-write leaves a last line without its newline: ignored, with a warning."""
    r = _healthy(tmp_path, "r")
    whole = check.read_metrics(r)
    text = (r / "metrics.jsonl").read_text()
    (r / "metrics.jsonl").write_text(text + '{"step": 999, "epoch": 29, "train/uni')
    assert check.read_metrics(r) == whole
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err and "torn last line" in err
    from tokenizer_train.__main__ import main

    assert main(["check", str(r)]) == 0
    out, err = capsys.readouterr()
    assert "ALL GATES PASS" in out and "torn last line" in err and "Traceback" not in err


def _table(text: str) -> dict[str, str]:
    """{gate name: its table row} of a printed table."""
    return {g: line for line in text.splitlines() for g in [line.split("  ")[0].strip()] if g}


def test_table_rounds_shows_whole_targets_and_not_logged(tmp_path, capsys):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.6123456789, 0.0, info=0.0123456789)
    r = _healthy(tmp_path, "r")
    rows = [{k: v for k, v in x.items() if k != "val/ce_bits_epoch"} for x in check.read_metrics(r)]
    gates = check.evaluate(rows, check.read_metrics(base))
    text = check.format_table(gates)
    assert "None" not in text and "0.6123456789" not in text and "0.0123456789" not in text
    rows_by = _table(text)
    ce = rows_by["val CE bits <= baseline"]
    assert "not logged" in ce and ce.rstrip().endswith("FAIL")
    vnw = rows_by["val not worse than baseline"]
    assert "acc >= 0.592, epe 0.6 <= 1.02" in vnw  # rounded, whole
    for g in gates:  # every target printed whole: none cut to a fixed width
        assert g.target in rows_by[g.name], (g.target, rows_by[g.name])


def test_short_run_gates_say_not_reached_and_count_neither_way(tmp_path, capsys):
    r = _run(tmp_path, "short", lambda f: 4 + 60 * f, lambda f: 0.1 + 0.5 * f, lambda f: 2 + 40 * f, 0.6, 0.4, epochs=5,
             usage=[1] * 10)
    gates = check.evaluate(check.read_metrics(r))
    g = {x.name: x for x in gates}
    for name in ("unique_codes@10", "entropy_norm@10", "unique_codes@30", "entropy_norm@30", "code usage multi-modal"):
        assert not g[name].reached and g[name].result == "not reached", name
    assert g["unique_codes@30"].passed and "so far meets the target" in g["unique_codes@30"].note
    text = check.format_table(gates)
    row = _table(text)["unique_codes@30"]
    assert "not reached" in row and "PASS" not in row
    assert check.report(gates)  # nothing reached fails: exit 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    passed, failed, waiting = check.counts(gates)
    assert waiting == 7 and failed == 0  # the 10- and 30-epoch gates; the code information gate is reached
    assert f"({passed}/{passed} reached gates pass; 7 not reached" in last
    # a 30-epoch run reaches them all
    full = check.evaluate(check.read_metrics(_healthy(tmp_path, "full")))
    assert all(x.reached for x in full) and "not reached" not in check.format_table(full)


def test_multimodal_reads_the_trainers_global_histogram(tmp_path):
    """The trainer logs per-code counts as train/code_usage_hist(_global); the all-rank one wins."""
    r = _run(tmp_path, "g", lambda f: 40, lambda f: 0.5, lambda f: 30, 0.6, 0.4, epochs=2)
    rows = check.read_metrics(r)
    rows = [x for x in rows if "train/code_usage_hist_global" not in x]
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


def _healthy(tmp_path, name, **kw):
    return _run(tmp_path, name, lambda f: 4 + 60 * f, lambda f: 0.1 + 0.5 * f, lambda f: 2 + 40 * f, 0.59, 0.4,
                usage=[20, 20, 20, 20, 20], **kw)


@pytest.mark.parametrize("base_info, info, passes", [
    (0.10, 0.39, False), (0.10, 0.41, True),  # 4x the baseline's is the binding target
    (0.01, 0.24, False), (0.01, 0.26, True),  # the 0.25 bits floor is
    (0.00, 0.25, True)])
def test_code_information_gate(tmp_path, base_info, info, passes):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0, info=base_info)
    r = _healthy(tmp_path, "r", info=info)
    g = {x.name: x for x in check.evaluate(check.read_metrics(r), check.read_metrics(base))}
    assert g[check.INFO_GATE].passed is passes and g[check.INFO_GATE].value == info


def test_code_information_gate_without_baseline_and_without_data(tmp_path):
    g = {x.name: x for x in check.evaluate(check.read_metrics(_healthy(tmp_path, "a", info=0.3)))}
    assert g[check.INFO_GATE].passed and "val CE bits <= baseline" not in g
    g = {x.name: x for x in check.evaluate(check.read_metrics(_healthy(tmp_path, "b", info=0.2)))}
    assert not g[check.INFO_GATE].passed
    rows = [{k: v for k, v in x.items() if k != "val/code_info_bits_epoch"}
            for x in check.read_metrics(_healthy(tmp_path, "c"))]
    g = {x.name: x for x in check.evaluate(rows)}
    assert not g[check.INFO_GATE].passed and g[check.INFO_GATE].value is None  # no data fails


def test_ce_gate(tmp_path):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0, ce=2.0)
    for name, ce, passes in (("lower", 1.9, True), ("equal", 2.0, True), ("higher", 2.01, False)):
        g = {x.name: x for x in check.evaluate(check.read_metrics(_healthy(tmp_path, name, ce=ce)),
                                               check.read_metrics(base))}
        assert g["val CE bits <= baseline"].passed is passes


def test_verdict_leads_with_code_information(tmp_path, capsys):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)
    good, empty = _healthy(tmp_path, "good"), _healthy(tmp_path, "empty", info=0.01)
    assert check.report(check.evaluate(check.read_metrics(good), check.read_metrics(base)))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("CODES CARRY INFORMATION (0.800 bits/label") and "ALL GATES PASS" in last
    assert not check.report(check.evaluate(check.read_metrics(empty), check.read_metrics(base)))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("CODES DO NOT CARRY INFORMATION (0.010 bits/label") and "SOME GATES FAIL" in last


def test_a_baseline_that_carries_information_is_named_in_the_verdict(tmp_path, capsys):
    """Above 0.25 bits but below 4x a baseline that itself learned: the verdict says the codes
    carry information and that the multiple fails; a multiple above the ceiling is unreachable."""
    from tokenizer_train.evaluate.code_info import max_bits

    assert check.INFO_CEILING_BITS == max_bits()
    base = _healthy(tmp_path, "learned_base", info=0.9)
    run = _healthy(tmp_path, "run", info=1.7)
    gates = check.evaluate(check.read_metrics(run), check.read_metrics(base))
    g = {x.name: x for x in gates}[check.INFO_GATE]
    assert g.result == "FAIL" and "unreachable" in g.note and "0.9 bits" in g.note  # 4 x 0.9 > log2(9)
    assert not check.report(gates)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("CODES CARRY INFORMATION (1.700 bits/label >= 0.25) BUT FAIL THE BASELINE MULTIPLE")
    assert "unreachable" in last and "SOME GATES FAIL" in last
    base = _healthy(tmp_path, "half_base", info=0.5)  # target 2.0: reachable, no such note
    g = {x.name: x for x in check.evaluate(check.read_metrics(run), check.read_metrics(base))}[check.INFO_GATE]
    assert g.result == "FAIL" and g.note == ""


def test_training_accuracy_gate_compares_on_the_evaluation_mask(tmp_path):
    """A filtered run's loss-mask accuracy is not comparable with the unfiltered baseline's;
    train/acc_evalmask_epoch of both runs is, and it wins when both have it."""
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)
    r = _healthy(tmp_path, "r")  # train/acc_epoch 0.59 vs 0.60: passes on the loss masks
    rows, brows = check.read_metrics(r), check.read_metrics(base)
    g = {x.name: x for x in check.evaluate(rows, brows)}["acc_epoch vs baseline@10"]
    assert g.passed and "train/acc_epoch: the runs' own loss masks" in g.note
    for x, v in ((rows, 0.50), (brows, 0.60)):
        for row in x:
            if "train/acc_epoch" in row:
                row["train/acc_evalmask_epoch"] = v
    g = {x.name: x for x in check.evaluate(rows, brows)}["acc_epoch vs baseline@10"]
    assert not g.passed and g.value == 0.50 and "loss masks" not in g.note


def test_tag_the_trainer_never_writes_is_not_read(tmp_path):
    r = _healthy(tmp_path, "r")
    rows = [x for x in check.read_metrics(r) if "train/code_usage_hist_global" not in x]
    rows.append({"step": 999, "epoch": 29, "train/code_usage_counts": [20, 20, 20, 20, 20]})
    g = {x.name: x for x in check.evaluate(rows)}
    assert not g["code usage multi-modal"].passed and g["code usage multi-modal"].value is None


@pytest.mark.parametrize("command", ["check", "ablate", "frontier"])
def test_help_has_no_rst_and_explains_the_seed(command, capsys):
    from tokenizer_train.__main__ import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "`" not in text
    # "the seed" (the original plan) is never used unexplained; training seeds are named as such
    for line in text.splitlines():
        if "the seed" in line:
            assert "called \"the seed\"" in line, line


@pytest.mark.parametrize("f_info, f_ce, info_ok, ce_ok", [(0.7, 2.2, True, True), (0.9, 2.2, False, True),
                                                          (0.7, 2.0, True, False)])
def test_filtered_baseline_gates_and_the_table_of_both_baselines(tmp_path, capsys, f_info, f_ce, info_ok, ce_ok):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0)
    fb = _run(tmp_path, "fb", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.3, info=f_info, ce=f_ce)
    r = _healthy(tmp_path, "r", info=0.8, ce=2.1)
    g = {x.name: x for x in check.evaluate(check.read_metrics(r), check.read_metrics(base), check.read_metrics(fb))}
    gi, gc = g["code information >= filtered baseline"], g["val CE bits <= filtered baseline"]
    assert gi.passed is info_ok and gc.passed is ce_ok
    assert f"gap {0.8 - f_info:+.3g} bits (goal +0.2)" in gi.note
    # without it, no such gate
    assert "code information >= filtered baseline" not in {x.name for x in check.evaluate(check.read_metrics(r))}
    # the CLI shows the run and both baselines side by side before the gates
    check_main = __import__("tokenizer_train.__main__", fromlist=["main"]).main
    check_main(["check", str(r), "--baseline", str(base), "--filtered-baseline", str(fb)])
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert [ln.split("  ")[0].strip() for ln in table[1:]] == ["this run", "baseline", "filtered baseline"]
    assert "code information >= filtered baseline" in out


def test_a_baseline_code_information_below_zero_is_clamped_in_the_target(tmp_path):
    base = _run(tmp_path, "base", lambda f: 1, lambda f: 0.0, lambda f: 1.0, 0.60, 0.0, info=-1.61e-05)
    g = {x.name: x for x in check.evaluate(check.read_metrics(_healthy(tmp_path, "r")), check.read_metrics(base))}
    assert "-" not in g[check.INFO_GATE].target and "4 x 0" in g[check.INFO_GATE].target


def test_the_filtered_baseline_variant_is_base_with_recommendeds_filter():
    from tokenizer_train.experiments import variants as V
    from tokenizer_train.common.config import load_config

    v = V.load_variants(V.DEFAULT_VARIANTS)[V.FILTERED]
    cfg = V.resolve(V.CONFIG_DIR / "base.yaml", v)
    rec = load_config(V.CONFIG_DIR / "recommended.yaml")
    assert cfg.data.static_filter == rec.data.static_filter and cfg.data.static_filter.enable
    base = load_config(V.CONFIG_DIR / "base.yaml")
    assert cfg.training == base.training and cfg.model == base.model  # nothing else changes
