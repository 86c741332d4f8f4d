"""The one-command demo, in its quick mode on synthetic data only."""
import json

from tokenizer_train import check
from tokenizer_train.__main__ import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-video", "--no-libero", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for step in ("1/6 data", "2/6 build-shards", "3/6 tune-filter", "4/6 train", "5/6 check", "6/6 frontier"):
        assert step in text
    assert "recommended: p95@" in text  # tune-filter's table and recommendation
    assert "| baseline |" in text and "| recommended |" in text  # the comparison table
    assert "val non-centre acc >= baseline + 0.25" in text  # the gate table
    assert ("ALL GATES PASS" in text) or ("SOME GATES FAIL" in text)  # a failing gate is not an error
    assert ("CODES CARRY INFORMATION" in text) or ("CODES DO NOT CARRY INFORMATION" in text)  # the verdict's lead
    assert "codes carry information" in text and "code information" in text  # gate table, frontier
    assert "tensorboard --logdir" in text
    abl = out / "ablation"
    assert (abl / "results.md").exists() and (abl / "check.json").exists()
    fr = json.loads((abl / "frontier.json").read_text())
    assert fr["split"] == "val" and any(r["offset"] == 0.0 for r in fr["table"])
    assert list((abl / "runs" / "recommended" / "seed0").glob("events.out.tfevents.*"))
    rows = check.read_metrics(abl / "runs" / "baseline" / "seed0")
    assert check.epochs_run(rows) == 2
    # the baseline is base.yaml as it is (no filter); recommended.yaml carries its own filter
    import yaml
    flt = {v: yaml.safe_load((abl / "runs" / v / "seed0" / "config.yaml").read_text())["data"]["static_filter"]
           for v in ("baseline", "recommended")}
    assert flt["baseline"]["enable"] is False and flt["recommended"]["enable"] is True
    assert any("val/code_info_bits_epoch" in r for r in rows)

    # rerun resumes: nothing is trained again, the same tables are printed
    assert main(["demo", "--out", str(out), "--quick", "--no-video", "--no-libero", "--no-progress"]) == 0
    assert "| recommended |" in capsys.readouterr().out
    assert check.epochs_run(check.read_metrics(abl / "runs" / "baseline" / "seed0")) == 2


def test_demo_fails_on_real_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--out", str(blocker), "--quick", "--no-video", "--no-libero", "--no-progress"]) != 0
    assert "demo: error" in capsys.readouterr().err
