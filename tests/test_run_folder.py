"""train --out: a run folder is new, resumed (--resume) or replaced (--overwrite), else refused;
user errors are one line; event files sit in RUN with the config as text and hparams."""
import json
import sys
from pathlib import Path

import pytest
import torch

from tokenizer_train.train import run_folder as RF
from tokenizer_train.__main__ import main
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from harness import small_build  # noqa: E402

# 18 clips, batch 4, val 0.25: a few steps per epoch
SETS = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=4",
        "training.log_interval=1", "data.val_split=0.25", "training.epochs=1", "training.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return small_build(tmp_path_factory.mktemp("build"))


def _cli(build, out, *extra):
    return ["train", "--data", str(build), "--out", str(out), "--no-progress", "--set", *SETS, *extra]


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss_step" in json.loads(x)]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_second_start_is_refused_and_overwrite_replaces_only_the_run(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli(build, out)) == 0
    first = _steps(out)
    assert first == list(range(1, len(first) + 1))
    (out / "notes.txt").write_text("mine")
    (out / "frontier.json").write_text("{}")  # the frontier's cache of this run (tokenizer_train.evaluate.frontier)
    capsys.readouterr()
    assert main(_cli(build, out)) == 2  # the same command again: refused, nothing appended
    line = _one_error_line(capsys)
    assert str(out) in line and f"--resume {out}" in line and "--overwrite" in line
    assert _steps(out) == first
    assert main(_cli(build, out, "--overwrite")) == 0
    assert _steps(out) == first  # each step once: the old rows are gone, not appended to
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert not (out / "frontier.json").exists()  # a stale cache of the old run: gone
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_a_folder_that_is_not_a_run_is_refused_even_with_overwrite(build, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("x")
    (out / "config.yaml.bak").write_text("y")
    for extra in ((), ("--overwrite",)):
        assert main(_cli(build, out, *extra)) == 2
        line = _one_error_line(capsys)
        assert str(out) in line and "not a run folder" in line and "chapter1.tex" in line
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex", "config.yaml.bak"]


def test_missing_build_is_one_line_and_leaves_no_folder(build, tmp_path, capsys):
    out = tmp_path / "new_run"
    assert main(_cli(tmp_path / "no_build", out)) == 2
    assert str(tmp_path / "no_build") in _one_error_line(capsys)
    assert not out.exists()
    # a failure while setting up (fp16 without CUDA) leaves no empty folder either
    assert main(_cli(build, out, "training.mixed_precision=fp16")) == 2
    assert "bf16" in _one_error_line(capsys) and not out.exists()
    # tokenize with a missing build: one line too
    run = tmp_path / "run"
    train(from_dict({}, SETS), build, run, progress=False)
    capsys.readouterr()
    assert main(["tokenize", "--run", str(run), "--data", str(tmp_path / "no_build"),
                 "--out", str(tmp_path / "codes.parquet")]) == 2
    assert str(tmp_path / "no_build") in _one_error_line(capsys)
    assert main(["tokenize", "--run", str(tmp_path / "no_run"), "--data", str(build),
                 "--out", str(tmp_path / "codes.parquet")]) == 2
    assert str(tmp_path / "no_run") in _one_error_line(capsys)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_clean(build, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_cli(build, out)) == 0
    steps = _steps(out)
    for name in ("last.pt", "last.prev.pt", "best.pt"):  # as if killed before the first save
        (out / name).unlink(missing_ok=True)
    (out / ".last.pt.tmp123").write_bytes(b"torn")
    old_events = list(out.glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(_cli(build, out)) == 2  # refused: it names both ways out
    line = _one_error_line(capsys)
    assert "before its first checkpoint" in line and f"--resume {out}" in line
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert _steps(out) == steps  # no stale rows
    events = list(out.glob("events.out.tfevents.*"))
    assert len(events) == 1 and not set(events) & set(old_events) and not (out / ".last.pt.tmp123").exists()
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss_step")] == steps


def test_resume_needs_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    line = _one_error_line(capsys)
    assert "nothing to resume" in line and str(tmp_path / "nothing") in line


def test_set_takes_several_pairs_and_repeats(build, tmp_path):
    import argparse

    from tokenizer_train.train import command as T

    p = argparse.ArgumentParser()
    T.add_arguments(p)
    args = p.parse_args(["--set", "a=1", "b=2", "--data", "x", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    out = tmp_path / "run"
    assert main(["train", "--data", str(build), "--out", str(out), "--no-progress", "--set", *SETS,
                 "model.hidden_dim=8", "--set", "training.seed=7"]) == 0
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["hidden_dim"] == 8 and cfg["training"]["seed"] == 7 and cfg["model"]["num_heads"] == 2


def test_tensorboard_run_folder_config_text_and_hparams(build, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = tmp_path / "runs"
    last = train(from_dict({}, SETS), build, runs / "baseline", progress=False)
    acc = EventAccumulator(str(runs / "baseline"))
    acc.Reload()
    assert "val/loss_epoch" in acc.Tags()["scalars"]
    # config as text: the YAML of config.yaml
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "hidden_dim: 16" in text
    # hparams: the flattened config and the run's final metrics
    content = acc.PluginTagToContent("hparams")
    infos = {}
    for blob in content.values():
        d = plugin_data_pb2.HParamsPluginData.FromString(blob)
        infos[d.WhichOneof("data")] = d
    start = infos["session_start_info"].session_start_info.hparams
    assert start["model.hidden_dim"].number_value == 16 and start["training.device"].string_value == "cpu"
    assert start["model.fsq_levels"].string_value == "[8, 8, 6, 5]"
    metric_tags = {m.name.tag for m in infos["experiment"].experiment.metric_infos}
    assert {"val/loss_epoch", "train/loss_epoch"} <= metric_tags <= {k for k in last if k.endswith("_epoch")}
    # tensorboard --logdir runs names the run "baseline": no sub-folder of event files
    assert [p for p in (runs / "baseline").iterdir() if p.is_dir()] == []


def test_old_tensorboard_folder_is_adopted_and_counts_as_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
    assert RF.holds_run(run)
    assert RF.adopt_old_events(run) == [run / "events.out.tfevents.1.host"]
    assert not (run / "tensorboard").exists()
    (run / "keep.txt").write_text("x")
    RF.remove_run(run)
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_ctrl_c_in_demo_is_one_line_saying_rerun_resumes(tmp_path, capsys, monkeypatch):
    from tokenizer_train.experiments import demo as DM
    from tokenizer_train.common.stop import Stopped

    for exc in (KeyboardInterrupt(), Stopped(2, 3, tmp_path / "run")):
        def interrupted(*a, **k):
            raise exc

        monkeypatch.setattr(DM, "demo", interrupted)
        assert main(["demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 130
        line = _one_error_line(capsys)
        assert "interrupted" in line and "run the same command again to resume" in line


@pytest.mark.parametrize("cmd", ["train", "tokenize", "demo"])
def test_help_has_no_rst_markup(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = capsys.readouterr().out
    assert "`" not in text and "the seed" not in text
    assert cmd == "tokenize" or "--no-progress" in text


def test_a_bug_while_training_keeps_its_traceback(build, tmp_path, monkeypatch):
    # only the user's errors (UserError) become one line; a ValueError from the code itself
    # must surface with its traceback, not be passed off as the user's mistake
    from tokenizer_train.train import trainer as T

    def bug(self, *a, **k):
        raise ValueError("an internal shape bug")
    monkeypatch.setattr(T, "train_epoch", bug)
    with pytest.raises(ValueError, match="internal shape bug"):
        main(_cli(build, tmp_path / "run"))


def test_each_epoch_end_logs_step_figures_even_under_a_long_interval(build, tmp_path):
    # a short run (fewer steps than log_interval) used to log no step row at all, so check's
    # step gates and ablate's entropy plots had nothing to show
    out = tmp_path / "run"
    assert main(_cli(build, out, "training.log_interval=1000", "training.epochs=2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "train/loss_step" in r]
    epoch_ends = [r["step"] for r in rows if "train/loss_epoch" in r]
    assert len(epoch_ends) == 2 and [r["step"] for r in step_rows] == epoch_ends
    assert all("train/unique_codes_step" in r and "train/entropy_norm_step" in r for r in step_rows)


@pytest.mark.parametrize("setting", [
    "training.logit_adjustment=1.0",           # needs class weights (class_weighting.method none)
    "model.groups=7",                           # must divide the build's points
    "model.max_steps=2",                        # fewer than the build's steps
    "training.lr_schedule.type=step training.lr_schedule.step_size=0",
    "training.device=cuda",                     # no CUDA here (skipped where there is)
])
def test_a_setting_that_cannot_work_is_one_line(build, tmp_path, capsys, setting):
    if "cuda" in setting and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(_cli(build, out, *setting.split())) == 2
    line = _one_error_line(capsys)
    assert setting.split()[-1].split("=")[0].rsplit(".", 1)[-1] in line or "cuda" in line.lower()
