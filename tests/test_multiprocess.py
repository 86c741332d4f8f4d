"""Several processes at once: 2-rank torchrun (gloo, CPU) training with shard and clip counts
that do not divide by the ranks and one loader worker per rank (no hang, equal steps per
rank, correct *_global statistics, exact resume after a SIGKILL); two --part builds running
in parallel, merged, equal one build."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from motion_data.read.verify import verify_build
from preprocess.__main__ import main as preprocess_main
from test_build import assert_same_content
from tokenizer_train.model import checkpoint as C
from tokenizer_train.evaluate.metrics import code_stats

sys.path.insert(0, str(Path(__file__).parent))
from harness import set_args, small_build, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # a hang fails the test instead of blocking the suite
# 19 clips in 3 shards (7, 7, 5), val 0.2 -> uneven train and val shares per rank; 20 clips
# drawn per epoch, batch 2 per rank: 5 steps per epoch
SETS = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=2",
        "training.epochs=2", "training.log_interval=1", "training.code_log_interval=1", "data.val_split=0.2",
        "training.device=cpu", "data.num_workers=1", "data.sampler.method=dynamic_ratio", "model.dropout=0.1",
        "training.save_interval=1", "model.quant_input_noise_std=0.05", "data.sampler.epoch_size=20"]
KILL_STEP = 7  # 5 steps per epoch: mid-epoch 1

# rank 0 pauses right after the checkpoint of step AT (rank 1 waits at the barrier); set
# E_PHASE=none for a plain run
WRAPPER = """
import os, sys, time
from tokenizer_train.model import checkpoint as C
phase, marker, at = os.environ.get("E_PHASE", "none"), os.environ.get("E_MARKER", ""), int(os.environ.get("E_AT", 0))
real_save = C.save
def save(path, state):
    out = real_save(path, state)
    if phase == "after_save" and state.get("step") == at:
        open(marker, "w").close()
        time.sleep(600)
    return out
if __name__ == "__main__":  # loader workers (forkserver) re-import this file as __mp_main__
    # torchrun starts each rank in a session of its own: the test kills them by these ids
    open(os.path.join(os.environ["E_PIDS"], "rank" + os.environ["RANK"]), "w").write(str(os.getpid()))
    C.save = save
    from tokenizer_train.__main__ import main
    sys.exit(main(sys.argv[1:]))
"""


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _kill_all(p, pids: Path):
    """SIGKILL the torchrun agent's process group and each rank's (ranks are session leaders,
    their loader workers and fork servers are in their groups)."""
    groups = [p.pid] + [int(f.read_text()) for f in pids.glob("rank*") if f.read_text().strip()]
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _torchrun(tmp_path, args, env_extra=None, wait=True):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    pids = tmp_path / "pids"
    shutil.rmtree(pids, ignore_errors=True)
    pids.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", E_PIDS=str(pids), **(env_extra or {}))
    p = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    if not wait:
        return p
    try:
        _, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_all(p, pids)
        p.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s (a hang)")
    return subprocess.CompletedProcess(cmd, p.returncode, "", err.decode())


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return small_build(tmp_path_factory.mktemp("ddp_build"), shard_sizes=(7, 7, 5))


@pytest.fixture(scope="module")
def ddp_run(build, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    out = d / "run"
    p = _torchrun(d, ["train", "--data", str(build), "--out", str(out), "--debug-codes", *set_args(SETS)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_uneven_shards_with_workers_equal_steps_and_global_stats(ddp_run):
    out = ddp_run
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    per_epoch = run["steps_per_epoch"]
    r0, r1 = _rows(out / "debug_codes_rank0.jsonl"), _rows(out / "debug_codes_rank1.jsonl")
    # every rank ran the same optimizer steps (each logs its codes at every step)
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == list(range(1, 2 * per_epoch + 1))
    assert all(np.asarray(a["codes"]).shape == np.asarray(b["codes"]).shape for a, b in zip(r0, r1))
    levels = C.load(out / "last.pt")["meta"]["levels"]
    rows = {r["step"]: r for r in _rows(out / "metrics.jsonl") if "train/unique_codes_step_global" in r}
    assert sorted(rows) == [r["step"] for r in r0]
    for a, b in zip(r0, r1):
        union = np.concatenate([np.asarray(a["codes"]), np.asarray(b["codes"])])
        g = code_stats(union, levels)
        row = rows[a["step"]]
        assert row["train/unique_codes_step_global"] == g["unique_codes"]
        assert row["train/code_usage_hist_global"] == g["counts"].tolist()
        assert row["train/entropy_norm_step_global"] == pytest.approx(g["entropy_norm"])
    # validation: two epochs, each over the whole (unevenly shared) validation split
    val = [r for r in _rows(out / "metrics.jsonl") if "val/loss_epoch" in r]
    assert [r["epoch"] for r in val] == [0, 1] and all(np.isfinite(r["val/loss_epoch"]) for r in val)
    st = C.load(out / "last.pt")
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    assert not torch.equal(st["ranks"][0]["rng"]["torch"], st["ranks"][1]["rng"]["torch"])


def test_ddp_sigkill_mid_epoch_then_resume_is_exact(build, ddp_run, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    p = _torchrun(tmp_path, ["train", "--data", str(build), "--out", str(out), *set_args(SETS)],
                  {"E_PHASE": "after_save", "E_MARKER": str(marker), "E_AT": str(KILL_STEP)}, wait=False)
    wait_for(marker, p, "the kill point", timeout=TIMEOUT)
    ranks = [int(f.read_text()) for f in (tmp_path / "pids").glob("rank*")]
    assert len(ranks) == 2
    _kill_all(p, tmp_path / "pids")  # the agent, both ranks and their loader workers
    p.wait()
    p.stderr.close()
    for pid in ranks:  # nothing of the killed job lives on
        t_end = time.time() + 20
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            assert time.time() < t_end, f"rank process {pid} survived the kill"
            time.sleep(0.05)
    st = C.load(out / "last.pt")
    assert st["step"] == KILL_STEP and st["batches_done"] > 0 and len(st["ranks"]) == 2
    r = _torchrun(tmp_path, ["train", "--resume", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = C.load(ddp_run / "last.pt")["model"], C.load(out / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # epoch figures are sums over both ranks, including the batches before the kill
    ref = [x for x in _rows(ddp_run / "metrics.jsonl") if "train/loss_epoch" in x]
    got = [x for x in _rows(out / "metrics.jsonl") if "train/loss_epoch" in x]
    assert [x["train/loss_epoch"] for x in got] == [x["train/loss_epoch"] for x in ref]
    assert [x["train/effective_codebook_size_seen_global"] for x in _rows(out / "metrics.jsonl")
            if "train/effective_codebook_size_seen_global" in x] == \
        [x["train/effective_codebook_size_seen_global"] for x in _rows(ddp_run / "metrics.jsonl")
         if "train/effective_codebook_size_seen_global" in x]


def test_two_parts_built_in_parallel_then_merged_equal_one_build(tiny_tracks, tmp_path, capsys):
    procs = [subprocess.Popen([sys.executable, "-m", "preprocess", "build-shards", "--input", str(tiny_tracks),
                               "--out", str(tmp_path / f"p{i}"), "--maxcount", "7", "--part", f"{i}/2",
                               "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:  # both running at once
        assert p.wait(timeout=TIMEOUT) == 0, p.stderr.read().decode()[-2000:]
        p.stderr.close()
    merged = tmp_path / "merged"
    assert preprocess_main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(merged)]) == 0
    single = tmp_path / "single"
    assert preprocess_main(["build-shards", "--input", str(tiny_tracks), "--out", str(single), "--maxcount", "7",
                            "--no-progress"]) == 0
    assert_same_content(merged, single, offsets=False)
    assert verify_build(merged) == verify_build(single) == 60
