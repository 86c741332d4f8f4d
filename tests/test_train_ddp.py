"""Two-process torchrun (gloo, CPU): *_global code statistics equal the single computation
over the union of both ranks' codes; both ranks train the same model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenizer_train import checkpoint
from tokenizer_train.metrics import code_stats

sys.path.insert(0, str(Path(__file__).parent))
from loader_fixtures import write_build  # noqa: E402


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_torchrun_two_ranks_global_code_stats(tmp_path):
    build = write_build(tmp_path / "build", shard_sizes=(6, 6, 6), sources=["v/a.h5", "v/b.h5", "v/c.h5"])
    out = tmp_path / "run"
    sets = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=2",
            "training.epochs=1", "training.log_interval=1", "data.val_split=0.2", "training.device=cpu",
            "data.sampler.method=dynamic_ratio"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tokenizer_train", "train", "--data", str(build), "--out", str(out), "--debug-codes",
           *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

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
