"""The training loop: a tiny model learns, exact resume, run folder contents, CLI errors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from motion_data.common.labels import center_class, labels_from_norm
from tokenizer_train.model import checkpoint
from tokenizer_train.__main__ import main
from tokenizer_train.common.config import ModelConfig, TrainingConfig, from_dict
from tokenizer_train.train.losses import Criterion
from tokenizer_train.evaluate.metrics import noncenter_counts
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.train.trainer import Hooks, train

sys.path.insert(0, str(Path(__file__).parent))
from harness import small_build  # noqa: E402

TINY = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=4",
        "training.log_interval=1", "data.val_split=0.25"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return small_build(tmp_path_factory.mktemp("build"))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_model_overfits_in_memory_batch():
    W, S, N = 15, 5, 8
    g = torch.Generator().manual_seed(0)
    v = torch.zeros(8, S, N, 2)
    moving = torch.rand(8, 1, N, 1, generator=g) < 0.5  # half the points move, the rest are static
    v += moving * (torch.randint(-5, 6, (8, 1, N, 2), generator=g).float() / 7.0)
    labels = labels_from_norm(v, W)
    mask = torch.ones(8, S, N, dtype=torch.bool)
    torch.manual_seed(0)
    model = MotionTokenizer(ModelConfig(hidden_dim=32, num_layers=1, num_heads=2, max_steps=S), N, W)
    crit = Criterion(TrainingConfig(), None, W)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    c = center_class(W)

    def evaluate():
        with torch.no_grad():
            out = model(v)
            return float(crit(out["logits"], labels, mask)[0]), noncenter_counts(out["logits"], labels, mask, c)

    loss0, (nc0, n_nc) = evaluate()
    assert n_nc > 0
    for _ in range(150):
        loss, _ = crit(model(v)["logits"], labels, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, (nc1, _) = evaluate()
    assert loss1 < 0.5 * loss0
    assert nc1 / n_nc > nc0 / n_nc + 0.3


def _params(path):
    return checkpoint.load(path)["model"]


def test_resume_equals_uninterrupted(build, tmp_path):
    sets = TINY + ["training.epochs=2", "model.dropout=0.1", "training.lr_schedule.type=cosine",
                   "training.lr_schedule.warmup_steps=2", "data.augment.enabled=true", "data.augment.jitter_std=0.01",
                   "model.quant_input_noise_std=0.05", "training.code_entropy_weight=0.1"]
    cfg = from_dict({}, sets)
    train(cfg, build, tmp_path / "a")
    train(cfg, build, tmp_path / "b", hooks=Hooks(stop_after_epochs=1))
    first = checkpoint.load(tmp_path / "b" / "last.pt")
    assert first["epoch"] == 1 and first["step"] > 0
    train(cfg, build, tmp_path / "b", resume=True)
    a, b = _params(tmp_path / "a" / "last.pt"), _params(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and one epoch alone did change the parameters (the comparison is not vacuous)
    assert any(not torch.equal(first["model"][k], a[k]) for k in a)


def test_mid_epoch_resume(build, tmp_path):
    sets = TINY + ["training.epochs=1", "training.save_interval=1", "data.val_split=0.0",
                   "training.code_entropy_weight=0.1"]  # its running average must resume too
    cfg = from_dict({}, sets)
    train(cfg, build, tmp_path / "a")
    assert checkpoint.load(tmp_path / "a" / "last.pt")["step"] == 4  # 18 clips / batch 4
    # an interrupted run: stop right after the first mid-epoch checkpoint (after step 1)
    import tokenizer_train.train.trainer as T
    orig = T.ckpt.save
    saved = []

    def save_once(path, state):
        if not saved and state["batches_done"] == 1:
            saved.append(True)
            return orig(path, state)
        if not saved:
            return orig(path, state)
        raise KeyboardInterrupt  # stop right after the first mid-epoch checkpoint

    T.ckpt.save = save_once
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, build, tmp_path / "c")
    finally:
        T.ckpt.save = orig
    assert checkpoint.load(tmp_path / "c" / "last.pt")["batches_done"] == 1
    train(cfg, build, tmp_path / "c", resume=True)
    a, c = _params(tmp_path / "a" / "last.pt"), _params(tmp_path / "c" / "last.pt")
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_run_folder_and_metric_names(build, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(build), "--out", str(out), *sum((["--set", s] for s in TINY), []),
               "--set", "training.epochs=2", "--set", "training.code_log_interval=2", "--set", "training.batch_size=1",
               "--set", "data.val_split=0.2"])
    assert rc == 0
    for name in ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (out / name).exists(), name
    assert list(out.glob("events.out.tfevents.*")) and not (out / "tensorboard").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tags = set().union(*rows)
    expected = {
        "train/unique_codes_step", "train/unique_codes_raw_step", "train/entropy_step", "train/entropy_norm_step",
        "train/perplexity_step", "train/code_usage_hist", "train/effective_codebook_size_seen", "train/acc_step",
        "train/acc_epoch", "train/loss_step", "train/loss_epoch", "train/loss_total_step", "train/total_loss_step",
        "train/dynamic_point_ratio_step", "val/dynamic_point_ratio_epoch", "val/loss_epoch", "val/acc_epoch",
        "train/unique_codes_step_global", "train/entropy_norm_step_global", "train/acc_noncenter_step",
        "val/acc_noncenter_epoch", "val/epe_px_epoch", "train/zero_code_frac_step", "val/unique_codes_epoch",
        "val/entropy_norm_epoch",
        # docs/DESIGN.md, "Quality beyond the seed's accuracy"
        "val/code_info_bits_epoch", "train/code_info_bits_step", "val/ce_bits_epoch", "val/auc_moving_epoch",
        "val/epe_zero_px_epoch", "train/acc_evalmask_epoch", "val/fsq_boundary_share_epoch"}
    assert expected <= tags, expected - tags
    # batches of one clip: no other clip's codes to decode with, so no estimate (null), never a 0
    assert all(r["train/code_info_bits_step"] is None for r in rows if "train/code_info_bits_step" in r)
    per_epoch = json.loads((out / "run.json").read_text())["steps_per_epoch"]
    assert per_epoch >= 4
    code_rows = [r for r in rows if "train/unique_codes_step" in r]
    assert [r["step"] for r in code_rows] == list(range(2, 2 * per_epoch + 1, 2))
    assert all(r["train/unique_codes_step"] == r["train/unique_codes_step_global"] for r in code_rows)
    for r in code_rows:
        counts = np.asarray(r["train/code_usage_hist"])
        assert counts.sum() == 1 * 15  # the logged step's batch: 1 clip, 15 tokens
        assert r["train/unique_codes_step"] == int((counts > 0).sum())
    seen0 = [r["train/effective_codebook_size_seen"] for r in code_rows if r["epoch"] == 0]
    assert len(seen0) >= 2 and all(a <= b for a, b in zip(seen0, seen0[1:]))  # grows within an epoch
    assert [r["epoch"] for r in rows if "val/loss_epoch" in r] == [0, 1]


def test_cli_errors(build, tmp_path, capsys):
    assert main(["train", "--data", str(build), "--out", str(tmp_path / "r"), "--set", "training.focal.gama=1"]) == 2
    assert "training.focal.gama" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--data", str(build), "--out", str(tmp_path / "r"),
                 "--set", "training.mixed_precision=fp16", "--set", "training.device=cpu"]) == 2
    assert "bf16" in capsys.readouterr().err


def test_bf16_on_cpu(build, tmp_path):
    last = train(from_dict({}, TINY + ["training.epochs=1", "training.mixed_precision=bf16", "training.device=cpu"]),
                 build, tmp_path / "r")
    assert np.isfinite(last["train/loss_epoch"]) and np.isfinite(last["val/loss_epoch"])


def test_tokenize_writes_every_clip(build, tmp_path):
    import pyarrow.parquet as pq

    from motion_data.read.loader import LoaderOptions, make_loader
    from tokenizer_train.model.checkpoint import load_model

    run = tmp_path / "run"
    train(from_dict({}, TINY + ["training.epochs=1"]), build, run)
    out = tmp_path / "codes.parquet"
    assert main(["tokenize", "--run", str(run), "--data", str(build), "--out", str(out), "--batch-size", "5"]) == 0
    t = pq.read_table(out).to_pydict()
    man = pq.read_table(build / "manifest.parquet").to_pydict()
    assert t["clip_id"] == man["clip_id"]
    assert all(len(c) == 15 for c in t["codes"])
    meta = json.loads(pq.read_schema(out).metadata[b"tokenizer"])
    assert meta["codebook_size"] == 1920 and all(0 <= x < 1920 for c in t["codes"] for x in c)
    # codes equal a direct forward of the trained model on the validation clips
    model, cfg, _ = load_model(run)
    val = make_loader(build, LoaderOptions(batch_size=4), split="val", val_split=cfg.data.val_split)
    by_id = dict(zip(t["clip_id"], t["codes"]))
    n = 0
    for b in val:
        with torch.no_grad():
            codes = model.encode(b["velocities"])["codes"]
        for cid, c in zip(b["clip_id"], codes.tolist()):
            assert by_id[cid] == c
            assert t["split"][t["clip_id"].index(cid)] == "val"
            n += 1
    assert n > 0
    assert main(["tokenize", "--run", str(tmp_path / "none"), "--data", str(build), "--out", str(out)]) == 2


def test_every_mitigation_switch_runs(tiny_build, tmp_path):
    # the real build: balanced weights read the class histograms of its stats.zarr
    sets = TINY + ["training.epochs=1", "data.sampler.epoch_size=16", "training.class_weighting.method=balanced", "training.focal.enabled=true",
                   "training.focal.alpha=per_class", "training.code_entropy_weight=0.05",
                   "training.code_entropy_type=kl_uniform", "model.quant_input_norm=layernorm",
                   "model.quant_input_tanh_scale.enabled=true", "model.quant_input_noise_std=0.1",
                   "training.clip_grad_norm=1.0", "training.lr_schedule.type=step",
                   "training.lr_schedule.step_size=1", "training.gradient_accumulation_steps=2",
                   "data.static_filter.enable=true", "data.sampler.method=dynamic_ratio"]
    last = train(from_dict({}, sets), tiny_build, tmp_path / "r")
    assert np.isfinite(last["train/loss_epoch"]) and np.isfinite(last["val/loss_epoch"])
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "train/loss_total_step" in r]
    assert step_rows and all(r["train/quant_input_tanh_scale"] is not None for r in step_rows)
    assert all("train/code_entropy_soft_step" in r for r in step_rows)
    # the regulariser is part of what is back-propagated
    assert any(r["train/loss_total_step"] != r["train/loss_step"] for r in step_rows)
    assert all(r["train/grad_norm"] >= 0 for r in step_rows)
    # code information of batches of 4 clips: defined, at most log2(3 + 1) = 2 bits per label
    info = [r["train/code_info_bits_step"] for r in rows if "train/code_info_bits_step" in r]
    assert info and all(v is not None and v <= 2.0 + 1e-9 for v in info)
    val = [r for r in rows if "val/code_info_bits_epoch" in r][-1]
    assert val["val/code_info_bits_epoch"] <= np.log2(9) + 1e-9 and val["val/ce_bits_epoch"] > 0
    assert val["val/epe_zero_px_epoch"] > 0
