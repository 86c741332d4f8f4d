"""Training survives being killed: SIGKILL mid-epoch (between steps or in the middle of a
checkpoint write) and a truncated newest checkpoint; ``--resume`` then ends with exactly the
parameters of an uninterrupted run (CPU, one thread, dropout, noise, augmentation on)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from motion_data.common.errors import DataError
from tokenizer_train.model import checkpoint as C
from tokenizer_train.__main__ import main
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from harness import HOLD_AT_STEP, set_args, small_build, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 18 clips, batch 4: 4 steps per epoch, 2 epochs; a checkpoint after every step
SETS = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=4",
        "training.log_interval=1", "data.val_split=0.0", "training.epochs=2", "training.save_interval=1",
        "training.device=cpu", "model.dropout=0.1", "model.quant_input_noise_std=0.05",
        "data.augment.enabled=true", "data.augment.jitter_std=0.01", "training.lr_schedule.type=cosine",
        "training.code_entropy_weight=0.1"]
KILL_STEP = 6  # epoch 1, mid-epoch

# runs the CLI, pausing (for the test to SIGKILL it) right after the checkpoint of step AT
# was saved, or with half of that checkpoint's bytes written under its temporary name
WRAPPER = """
import io, os, sys, time, torch
torch.set_num_threads(1)
from tokenizer_train.model import checkpoint as C
phase, marker, at = os.environ["E_PHASE"], os.environ["E_MARKER"], int(os.environ["E_AT"])
def pause():
    open(marker, "w").close()
    time.sleep(600)
real_save, real_torch_save = C.save, torch.save
def save(path, state):
    out = real_save(path, state)
    if phase == "after_save" and state.get("step") == at:
        pause()
    return out
def torch_save(obj, f, *a, **k):
    if phase == "during_save" and isinstance(obj, dict) and obj.get("step") == at:
        b = io.BytesIO()
        real_torch_save(obj, b)
        f.write(b.getvalue()[: len(b.getvalue()) // 2])
        f.flush()
        pause()
    return real_torch_save(obj, f, *a, **k)
C.save, torch.save = save, torch_save
from tokenizer_train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # the subprocesses run with one thread too: same float sums


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return small_build(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def reference(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(from_dict({}, SETS), build, out)
    finally:
        torch.set_num_threads(n)
    return out


def _params(path):
    return C.load(path)["model"]


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def _run_and_kill(build, out, phase, tmp_path):
    marker = tmp_path / f"paused-{phase}"
    env = dict(os.environ, OMP_NUM_THREADS="1", E_PHASE=phase, E_MARKER=str(marker), E_AT=str(KILL_STEP))
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, "train", "--data", str(build), "--out", str(out),
                          *set_args(SETS)], cwd=REPO, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(marker, p, "the kill point")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("phase", ["after_save", "during_save", "truncated_last"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(build, reference, tmp_path, phase, capsys):
    out = tmp_path / "run"
    _run_and_kill(build, out, "during_save" if phase == "during_save" else "after_save", tmp_path)
    last = C.load(out / "last.pt")  # whatever the kill hit, last.pt is a complete checkpoint
    expect = KILL_STEP - 1 if phase == "during_save" else KILL_STEP
    assert (last["step"], last["epoch"], last["batches_done"]) == (expect, 1, expect - 4)
    # save_last renames the current file to last.prev.pt before writing the next one
    assert C.load(out / "last.prev.pt")["step"] == (expect if phase == "during_save" else expect - 1)
    if phase == "during_save":  # the torn write exists only under a temporary name
        assert list(out.glob(".last.pt.tmp*"))
    if phase == "truncated_last":
        data = (out / "last.pt").read_bytes()
        (out / "last.pt").write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(DataError, match=r"last\.pt: cannot read checkpoint"):
            C.load(out / "last.pt")
    # TensorBoard reads event files in name order, and the name carries the creation second:
    # a resume within the same second as the kill could sort before the killed run's file
    time.sleep(1.1)
    assert main(["train", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    if phase == "truncated_last":
        line = next(x for x in err.splitlines() if x.startswith("warning:"))
        assert str(out / "last.pt") in line and "resuming from" in line and str(out / "last.prev.pt") in line
    else:
        assert "resuming from" not in err
    _assert_same_params(reference / "last.pt", out / "last.pt")
    # nothing torn or temporary is left; metrics.jsonl has each step once, as the reference
    assert not list(out.glob(".*.tmp*")) and not list(out.glob(".*.link"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss_step" in r]
    assert steps == list(range(1, 9)) == [r["step"] for r in ref_rows if "train/loss_step" in r]
    assert [r["train/loss_step"] for r in rows if "train/loss_step" in r] == \
        [r["train/loss_step"] for r in ref_rows if "train/loss_step" in r]
    # the epoch totals after the resume include the batches before the kill
    assert [r["train/loss_epoch"] for r in rows if "train/loss_epoch" in r] == \
        [r["train/loss_epoch"] for r in ref_rows if "train/loss_epoch" in r]
    # TensorBoard too: the resumed writer purges what the killed run logged after its checkpoint
    assert sorted(_tb_steps(out, "train/loss_step")) == list(range(1, 9))


def _tb_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_save_last_keeps_the_previous_and_load_latest_falls_back(tmp_path):
    p = tmp_path / "last.pt"
    for step in (1, 2, 3):
        C.save_last(p, {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step, "epoch": 0})
    assert C.load(p)["step"] == 3 and C.load(C.prev_path(p))["step"] == 2
    st, used, problems = C.load_latest(p)
    assert (st["step"], used, problems) == (3, p, [])
    whole = p.read_bytes()
    for cut in (0, 1, 100, len(whole) // 2, len(whole) - 1):
        p.write_bytes(whole[:cut])
        with pytest.raises(DataError) as e:
            C.load(p)
        assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)
        st, used, problems = C.load_latest(p)
        assert st["step"] == 2 and used == C.prev_path(p)
        assert len(problems) == 1 and problems[0].startswith(str(p))
    C.prev_path(p).write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        C.load_latest(p)
    assert str(p) in str(e.value) and str(C.prev_path(p)) in str(e.value)
    # a readable file that is no training checkpoint is not taken for one
    torch.save({"hello": torch.zeros(1)}, p)
    with pytest.raises(DataError, match="not a training checkpoint"):
        C.load_latest(p)


def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "last.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 1, "epoch": 0, "x": _Evil(str(marker))}, p)
    with pytest.raises(DataError, match=r"last\.pt: cannot read checkpoint"):
        C.load(p)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_with_every_checkpoint_unreadable_is_a_clear_error(build, tmp_path, capsys):
    out = tmp_path / "run"
    train(from_dict({}, SETS[:-5] + ["training.epochs=1"]), build, out)
    for p in (out / "last.pt", out / "last.prev.pt"):
        p.write_bytes(p.read_bytes()[:50])
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "last.pt") in err[0] and str(out / "last.prev.pt") in err[0]
    (out / "run.json").write_text('{"data": ')  # torn by a kill: named, not a traceback
    assert main(["train", "--resume", str(out)]) == 2
    assert str(out / "run.json") in capsys.readouterr().err


def test_rank_state_needs_the_same_world_size_mid_epoch():
    from tokenizer_train.common.distributed import Dist
    from tokenizer_train.model.checkpoint import rank_state

    ranks = [{"rng": r, "epoch_sums": {}, "seen": torch.zeros(2, dtype=torch.bool), "skipped": r} for r in range(2)]
    st = {"ranks": ranks, "rng": 0, "epoch_sums": {}, "seen": None, "loader": {}}
    assert rank_state(st, Dist(rank=1, world_size=2), start_batch=3)["skipped"] == 1
    with pytest.raises(ValueError, match="mid-epoch by 2 processes"):
        rank_state(st, Dist(rank=0, world_size=1), start_batch=3)
    assert rank_state(st, Dist(rank=0, world_size=3), start_batch=0) is None  # epoch boundary: fresh seeds
    old = {"rng": "r0", "epoch_sums": {"loss": 1.0}, "seen": None, "loader": {"skipped": 4}}  # no per-rank list
    assert rank_state(old, Dist(), start_batch=2)["rng"] == "r0"




@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_prints_resume_line_and_resume_equals_uninterrupted(build, reference, tmp_path, sig, capsys):
    out = tmp_path / "run"
    marker = tmp_path / "at-step"
    env = dict(os.environ, OMP_NUM_THREADS="1", E_MARKER=str(marker), E_AT=str(KILL_STEP))
    p = subprocess.Popen([sys.executable, "-c", HOLD_AT_STEP, "train", "--data", str(build), "--out", str(out),
                          "--no-progress", *set_args(SETS), "--set", "training.save_interval=0"],  # epoch ends only:
                         cwd=REPO, env=env, start_new_session=True,  # the mid-epoch checkpoint is the signal's
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(marker, p, f"step {KILL_STEP}")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if "resume" in x]
    assert len(lines) == 1 and lines[0].endswith(f"resume with: python -m tokenizer_train train --resume {out}"), err
    assert signal.Signals(sig).name in lines[0] and f"step {KILL_STEP}" in lines[0]
    st = C.load(out / "last.pt")  # saved at the step the signal interrupted, mid-epoch
    assert (st["step"], st["epoch"], st["batches_done"]) == (KILL_STEP, 1, KILL_STEP - 4)
    assert max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) == KILL_STEP
    time.sleep(1.1)  # the resumed event file must sort after the first one (names carry the second)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_params(reference / "last.pt", out / "last.pt")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss_step" in r] == list(range(1, 9))
    assert sorted(_tb_steps(out, "train/loss_step")) == list(range(1, 9))


def test_stop_signals_flag_and_second_ctrl_c():
    from tokenizer_train.common.stop import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM  # no exit: a flag
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: at once
            time.sleep(0.05)


# runs the CLI, waiting inside the last epoch's validation until a signal has arrived
VAL_WRAPPER = """
import os, sys, time, torch
torch.set_num_threads(1)
import tokenizer_train.evaluate.validate as V
marker, last_epoch = os.environ["E_MARKER"], int(os.environ["E_LAST"])
real_pool = V.code_pool
calls = []
def code_pool(model, loader, where, dist, autocast, should_stop=None):
    calls.append(1)
    if len(calls) == last_epoch + 1:  # the last epoch's validation has begun
        open(marker, "w").close()
        t0 = time.time()
        while not should_stop() and time.time() - t0 < 120:
            time.sleep(0.01)
    return real_pool(model, loader, where, dist, autocast, should_stop)
V.code_pool = code_pool
from tokenizer_train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_during_the_final_validation_saves_exits_130_and_resume_runs_that_validation(build, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "in-validation"
    sets = [s for s in SETS if not s.startswith("data.val_split")] + ["data.val_split=0.3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", E_MARKER=str(marker), E_LAST="1")
    p = subprocess.Popen([sys.executable, "-c", VAL_WRAPPER, "train", "--data", str(build), "--out", str(out),
                          "--no-progress", *set_args(sets)],
                         cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    wait_for(marker, p, "its last validation")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and sum("resume with:" in x for x in err.splitlines()) == 1, err
    st = C.load(out / "last.pt")
    assert st["epoch"] == 2 and st["val_due"]["epoch"] == 1  # the validation is recorded as still due
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("val/loss_epoch" in r and r["epoch"] == 1 for r in rows)
    # --resume runs that validation and ends the run with its one closing line
    r = subprocess.run([sys.executable, "-m", "tokenizer_train", "train", "--resume", str(out), "--no-progress"],
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import re

    m = re.search(r"resumed at step (\d+) of (\d+) \(epoch 2, its validation first\)", r.stderr)
    assert m and m.group(1) == m.group(2) == str(st["step"]), r.stderr
    assert f"done: {out / 'best.pt'}; last validation: code information" in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val/loss_epoch" in r] == [0, 1]
    assert C.load(out / "last.pt")["val_due"] is None
    # a finished run says so, and how to train longer
    r = subprocess.run([sys.executable, "-m", "tokenizer_train", "train", "--resume", str(out), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "finished (2 of 2 epochs)" in r.stderr and "--set training.epochs=N" in r.stderr
