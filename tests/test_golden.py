"""Golden regression: a tiny recommended-config training on three rollouts of the shipped
LIBERO sample (one per suite), fixed seed, one thread, a few dozen steps, must log the figures stored in tests/data/golden_metrics.json
(within float tolerance). A change that claims "results unchanged" is held to it; a change
that means to change results regenerates the file and says so in its commit:

    GOLDEN_REGENERATE=1 python -m pytest tests/test_golden.py
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from motion_data.build.build_shards import build
from motion_data.sources.libero import sample as LS
from tokenizer_train.common.config import load_config
from tokenizer_train.train.trainer import train

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_metrics.json"
REPO = Path(__file__).resolve().parents[1]
SETS = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8",
        "training.epochs=3", "training.log_interval=1", "training.code_log_interval=4", "data.val_split=0.3",
        "training.device=cpu", "data.num_workers=0", "training.seed=0"]
# figures compared: every step's loss and accuracy, every epoch's validation figures
KEYS = ("train/loss_step", "train/acc_step", "train/acc_noncenter_step", "train/code_info_bits_step",
        "train/unique_codes_step", "val/loss_epoch", "val/code_info_bits_epoch", "val/ce_bits_epoch",
        "val/acc_epoch", "val/acc_noncenter_epoch", "val/epe_px_epoch", "val/auc_moving_epoch")


ROLLOUTS = ("libero_90_0_0", "libero_object_0_0", "libero_spatial_0_0")


def test_a_tiny_recommended_run_on_libero_logs_the_stored_figures(tmp_path):
    files = LS.unpack(tmp_path / "sample")
    for f in files:
        if f.stem not in ROLLOUTS:
            f.unlink()
    assert sorted(f.stem for f in (tmp_path / "sample").glob("*.npz")) == sorted(ROLLOUTS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build([str(tmp_path / "sample")], tmp_path / "build", progress=False)
        cfg = load_config(REPO / "configs" / "recommended.yaml", SETS)
        train(cfg, tmp_path / "build", tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = [{"step": r["step"], **{k: r[k] for k in KEYS if k in r and r[k] is not None}} for r in rows]
    got = [g for g in got if len(g) > 1]
    if os.environ.get("GOLDEN_REGENERATE"):
        GOLDEN.write_text(json.dumps(got, indent=0) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert len(got) == len(want) >= 20
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g["step"], sorted(set(g) ^ set(w)))
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=2e-3, abs=2e-4) or (math.isnan(v) and math.isnan(g[k])), \
                (g["step"], k, g[k], v)
