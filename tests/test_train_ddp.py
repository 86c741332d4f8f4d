"""Two-process torchrun (gloo, CPU): *_global code statistics equal the single computation
over the union of both ranks' codes; both ranks train the same model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenizer_train.model import checkpoint
from tokenizer_train.evaluate.metrics import code_stats

sys.path.insert(0, str(Path(__file__).parent))
from harness import HOLD_AT_STEP, small_build, wait_for  # noqa: E402


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_torchrun_two_ranks_global_code_stats(tmp_path):
    build = small_build(tmp_path / "build")
    out = tmp_path / "run"
    sets = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=2",
            "training.epochs=1", "training.log_interval=1", "data.val_split=0.2", "training.device=cpu",
            "data.sampler.method=dynamic_ratio", "training.code_entropy_weight=0.1",
            "training.code_entropy_token_weight=0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tokenizer_train", "train", "--data", str(build), "--out", str(out), "--debug-codes",
           *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FutureWarning" not in p.stderr, p.stderr[-3000:]  # DDP's broadcast_buffers, distributed.nn's all_reduce

    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    levels = checkpoint.load(out / "last.pt")["meta"]["levels"]
    rows = {r["step"]: r for r in _rows(out / "metrics.jsonl") if "train/unique_codes_step_global" in r}
    r0 = {r["step"]: np.asarray(r["codes"]) for r in _rows(out / "debug_codes_rank0.jsonl")}
    r1 = {r["step"]: np.asarray(r["codes"]) for r in _rows(out / "debug_codes_rank1.jsonl")}
    assert rows and set(rows) == set(r0) == set(r1)
    differs = False
    for step, row in rows.items():
        union = np.concatenate([r0[step], r1[step]])
        g, local = code_stats(union, levels), code_stats(r0[step], levels)
        assert row["train/unique_codes_step_global"] == g["unique_codes"]
        assert row["train/unique_codes_raw_step_global"] == g["unique_codes_raw"]
        assert row["train/entropy_norm_step_global"] == pytest.approx(g["entropy_norm"])
        assert row["train/perplexity_step_global"] == pytest.approx(g["perplexity"])
        assert row["train/code_usage_hist_global"] == g["counts"].tolist()
        assert row["train/unique_codes_step"] == local["unique_codes"]
        assert row["train/entropy_norm_step"] == pytest.approx(local["entropy_norm"])
        differs |= g["counts"].tolist() != local["counts"].tolist()
    assert differs  # rank 1 contributed codes of its own
    # distinct codes seen so far (every step is logged here): rank 0's, and both ranks'
    seen, seen_g = np.zeros(int(np.prod(levels)), bool), np.zeros(int(np.prod(levels)), bool)
    for step in sorted(rows):
        seen[r0[step].ravel()] = True
        seen_g[np.concatenate([r0[step], r1[step]]).ravel()] = True
        assert rows[step]["train/effective_codebook_size_seen"] == int(seen.sum())
        assert rows[step]["train/effective_codebook_size_seen_global"] == int(seen_g.sum())




def test_sigterm_to_one_rank_stops_both_at_one_step_then_resume(tmp_path):
    import signal
    import time

    build = small_build(tmp_path / "build")
    out, marker, wrapper = tmp_path / "run", tmp_path / "rank1.pid", tmp_path / "wrapper.py"
    wrapper.write_text(HOLD_AT_STEP)  # rank 1 waits for the test's SIGTERM, rank 0 never gets one
    sets = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=2",
            "training.epochs=2", "training.log_interval=1", "data.val_split=0.0", "training.device=cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", E_MARKER=str(marker), E_AT="2", E_RANK="1")
    p = subprocess.Popen([*launch, str(wrapper), "train", "--data", str(build), "--out", str(out), "--no-progress",
                          "--set", *sets], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    wait_for(marker, p, "step 2", timeout=240)
    os.kill(int(marker.read_text()), signal.SIGTERM)
    _, err = p.communicate(timeout=240)  # no hang: rank 0 agrees to stop at the same step
    assert p.returncode != 0
    lines = [x for x in err.splitlines() if "resume with:" in x]
    assert len(lines) == 1 and lines[0].endswith(
        f"resume with: torchrun --nproc-per-node 2 -m tokenizer_train train --resume {out}"), err[-3000:]
    st = checkpoint.load(out / "last.pt")
    assert (st["step"], st["epoch"], st["batches_done"], len(st["ranks"])) == (2, 0, 2, 2)
    assert max(r["step"] for r in _rows(out / "metrics.jsonl")) == 2
    one = subprocess.run([sys.executable, "-m", "tokenizer_train", "train", "--resume", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 2 and "mid-epoch by 2 processes; resume it with 2 (now 1)" in one.stderr, one.stderr[-2000:]
    assert len(one.stderr.strip().splitlines()) == 1  # one line, no traceback
    time.sleep(1.1)  # the resumed event file sorts after the first
    p = subprocess.run([*launch, "-m", "tokenizer_train", "train", "--resume", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    per_epoch = json.loads((out / "run.json").read_text())["steps_per_epoch"]
    steps = [r["step"] for r in _rows(out / "metrics.jsonl") if "train/loss_step" in r]
    assert steps == list(range(1, 2 * per_epoch + 1))  # each step once: none stale, none missing


def test_two_ranks_then_one_process_at_an_epoch_boundary(tmp_path):
    """A run of 2 ranks stopped at an epoch boundary continues in one process (the sampler
    draws the same epochs; per-rank RNG states start afresh, as the warning says)."""
    build = small_build(tmp_path / "build")
    out = tmp_path / "run"
    sets = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=2",
            "training.epochs=1", "data.val_split=0.2", "training.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "tokenizer_train", "train", "--data", str(build), "--out", str(out), "--no-progress",
                        *sum((["--set", s] for s in sets), [])], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "tokenizer_train", "train", "--resume", str(out), "--no-progress",
                        "--set", "training.epochs=2"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "comes from another world size" in p.stderr
    st = checkpoint.load(out / "last.pt")
    assert (st["epoch"], st["batches_done"], len(st["ranks"])) == (2, 0, 1)  # epoch 1 ran in one process
    val = [r["epoch"] for r in _rows(out / "metrics.jsonl") if any(k.startswith("val/") for k in r)]
    assert val == [0, 1]  # each epoch validated once
    assert json.loads((out / "run.json").read_text())["world_size"] == 1
