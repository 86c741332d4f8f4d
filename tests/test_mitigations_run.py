"""Short CPU runs on the tiny build: each mitigation alone moves its metric the intended way,
and every switch present but off reproduces the baseline bit for bit."""
import json
import math

import numpy as np
import pytest
import torch

from tokenizer_train.common.config import from_dict
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.train.trainer import Hooks, train

EPOCHS = 3
TINY = ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8",
        "training.log_interval=1", "data.val_split=0.2", "training.learning_rate=3e-3", f"training.epochs={EPOCHS}"]

# every mitigation key present, each with its off value (and non-default side parameters)
PRESENT_BUT_OFF = [
    "training.code_entropy_weight=0.0", "training.code_entropy_warmup_epochs=2", "training.code_entropy_type=kl_uniform",
    "training.code_entropy_temperature=0.5",
    "training.class_weighting.method=none", "training.class_weighting.center_gamma=0.1",
    "training.class_weighting.power=0.5", "training.class_weighting.min_weight=0.2",
    "training.focal.enabled=false", "training.focal.gamma=3.0", "training.focal.alpha=0.25",
    "model.quant_input_norm=none", "model.quant_input_tanh_scale.enabled=false",
    "model.quant_input_tanh_scale.init=2.0", "model.quant_input_noise_std=0.0",
    "training.clip_grad_norm=0.0", "training.lr_schedule.type=none", "training.lr_schedule.warmup_steps=0",
    "training.lr_schedule.step_size=3", "training.lr_schedule.min_lr=1e-5", "training.mixed_precision=no",
]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(run, tag):
    return [r[tag] for r in rows(run) if tag in r]


def late(run, tag, frac=0.3):
    v = series(run, tag)
    assert v, f"{tag} not logged"
    return float(np.mean(v[-max(1, math.ceil(frac * len(v))):]))


@pytest.fixture(scope="module")
def runs(tiny_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("mitigation_runs")

    def run(name, sets, **kw):
        out = root / name
        train(from_dict({}, TINY + sets), tiny_build, out, **kw)
        return out

    return run


@pytest.fixture(scope="module")
def baseline(runs):
    return runs("baseline", [])


def test_present_but_off_is_the_baseline_bit_for_bit(runs, baseline):
    off = runs("off", PRESENT_BUT_OFF, hooks=Hooks(stop_after_epochs=1))
    a = [r for r in rows(baseline) if r["epoch"] == 0]
    b = rows(off)
    assert len(a) == len(b) > 1
    for ra, rb in zip(a, b):
        ra = {k: v for k, v in ra.items() if not k.startswith("perf/")}
        rb = {k: v for k, v in rb.items() if not k.startswith("perf/")}
        assert ra == rb


def test_entropy_regulariser_raises_code_entropy(runs, baseline):
    ent = runs("entropy", ["training.code_entropy_weight=0.5"])
    base_h, ent_h = late(baseline, "train/entropy_norm_step"), late(ent, "train/entropy_norm_step")
    print(f"entropy_norm_step late: baseline {base_h:.3f}, lambda=0.5 {ent_h:.3f}")
    assert ent_h > base_h + 0.05
    assert late(ent, "train/unique_codes_step") > late(baseline, "train/unique_codes_step")
    assert series(ent, "train/code_entropy_soft_step") and not series(baseline, "train/code_entropy_soft_step")


def test_balanced_weighting_raises_noncenter_accuracy(runs, baseline):
    bal = runs("balanced", ["training.class_weighting.method=balanced"])
    tag = "train/acc_noncenter_epoch"
    b, w = series(baseline, tag)[-1], series(bal, tag)[-1]
    print(f"{tag} last epoch: baseline {b:.4f}, balanced {w:.4f}")
    assert w > b + 0.01
    # the weights used are kept with the run (a W x W map, centre down-weighted) and in TensorBoard
    cw = np.load(bal / "class_weights.npy")
    assert cw.shape == (15, 15) and cw[7, 7] < np.median(cw)
    assert not (baseline / "class_weights.npy").exists()


@pytest.mark.parametrize("shaping", ["layernorm", "rmsnorm", "tanh"])
def test_shaping_changes_quantiser_input(shaping):
    """Stage 3 acts on the FSQ input of the model itself: norm -> unit scale, tanh -> bounded."""
    sets = {"layernorm": ["model.quant_input_norm=layernorm"], "rmsnorm": ["model.quant_input_norm=rmsnorm"],
            "tanh": ["model.quant_input_tanh_scale.enabled=true", "model.quant_input_tanh_scale.init=1.0"]}[shaping]
    v = torch.randn(4, 15, 100, 2) * 3  # large inputs: the baseline's FSQ input is far from unit scale

    def quant_in(extra):
        torch.manual_seed(0)
        cfg = from_dict({}, TINY + extra).model
        m = MotionTokenizer(cfg, num_points=100, window_size=15).eval()
        with torch.no_grad():
            return m(v)["quant_in"]

    base, shaped = quant_in([]), quant_in(sets)
    if shaping == "tanh":
        assert shaped.abs().max() < 1.0 <= base.abs().max()
    elif shaping == "layernorm":
        assert torch.allclose(shaped.mean(-1), torch.zeros(shaped.shape[:-1]), atol=1e-5)
        assert torch.allclose(shaped.var(-1, unbiased=False), torch.ones(shaped.shape[:-1]), atol=1e-2)
    else:
        assert torch.allclose(shaped.pow(2).mean(-1), torch.ones(shaped.shape[:-1]), atol=1e-2)
    assert not torch.allclose(base, shaped)
