"""The one-command demo, in its quick mode on synthetic data only."""
import json

from tokenizer_train.evaluate import check
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


def test_quick_demo_on_a_libero_sample_ends_with_the_side_by_side_picture(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from PIL import Image

    from motion_data.sources.libero import sample as LS

    rendered = sorted((Path(__file__).parent / "data" / "libero").glob("*.npz"))
    sample = tmp_path / "sample" / "libero_sample.npz"
    LS.pack(rendered, sample, {"command": "python -m preprocess render-libero --seed 0 (test)"})
    monkeypatch.setattr(LS, "SAMPLE", sample)
    monkeypatch.setattr(LS, "SAMPLE_INFO", sample.with_suffix(".json"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--data", "libero-sample", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "LIBERO sample: 3 rollouts" in text and "| filtered_baseline |" in text
    assert "code information >= filtered baseline" in text  # check against both baselines
    pic = out / "ablation" / "compare.png"
    assert f"held-out clip's moving points: {pic}" in text
    with Image.open(pic) as im:
        assert im.size[0] == 2 * im.size[1] - 2 * 44 or im.size[0] == 640  # two panels of 320 px
    # a wrong --data is one line
    assert main(["demo", "--out", str(out), "--data", str(tmp_path / "nope")]) == 2
