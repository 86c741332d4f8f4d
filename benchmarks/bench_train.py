"""Training throughput (clips/s) of the real loop, next to a model-only baseline.

Writes synthetic tracks (N = 400 points, 20x20 grid), builds them, then for each setting
runs (a) the real training loop (``tokenizer_train.train.train``: loader, forward, loss,
backward, AdamW; its ``perf/clips_per_s`` and ``perf/loader_wait_share`` from metrics.jsonl,
first log interval dropped as warm-up) and (b) the same model and optimizer on one batch
held in memory (no loader): the ceiling the loop could reach. Loader-wait share = time
spent waiting for the next batch / wall time of the logged steps.

    python benchmarks/bench_train.py                       # default model on CPU (< 2 min)
    python benchmarks/bench_train.py --preset amplify --device cuda   # hidden 768, 2+2, bf16, batch 256
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motion_data.build import build
from motion_data.loader import make_loader
from motion_data.synth import write_synth
from tokenizer_train.config import from_dict
from tokenizer_train.losses import Criterion
from tokenizer_train.model import MotionTokenizer
from tokenizer_train.model_inputs import model_kwargs
from tokenizer_train.train import autocast_for, train

PRESETS = {
    "default": [],
    "amplify": ["model.hidden_dim=768", "model.num_layers=2", "model.num_heads=8",
                "training.mixed_precision=bf16", "training.batch_size=256"],
}


def model_only(cfg, batch, steps, device) -> float:
    """clips/s of forward + loss + backward + AdamW on one in-memory batch."""
    torch.manual_seed(0)
    W = cfg.data.window_size
    N = batch["velocities"].shape[2]
    model = MotionTokenizer(cfg.model, N, W).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate)
    crit = Criterion(cfg.training, None, W)
    b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}

    def one():
        with autocast_for(cfg.training.mixed_precision, device):
            out = model(b["velocities"], **model_kwargs(b))
            loss, _ = crit(out["logits"], b["labels"], b["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * b["velocities"].shape[0] / (time.perf_counter() - t)


def loop(cfg, data, out, steps) -> tuple[float, float, float]:
    """(clips/s, loader-wait share, peak CUDA GiB) of the real loop, warm-up interval dropped."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg, data, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "perf/clips_per_s" in r][1:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return (float(np.mean([r["perf/clips_per_s"] for r in perf])),
            float(np.mean([r["perf/loader_wait_share"] for r in perf])), peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model/batch setting")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="loader worker counts to measure")
    ap.add_argument("--clips", type=int, default=300, help="synthetic clips to generate")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synth(tmp / "in", args.clips, seed=0)
        build([str(tmp / "in")], tmp / "build", progress=False)
        base = PRESETS[args.preset] + [f"training.device={args.device}", "data.val_split=0.0", "training.epochs=1"]
        cfg0 = from_dict({}, base)
        bs = cfg0.training.batch_size
        log = max(2, args.steps // 3)  # the first log interval is warm-up and dropped
        sets = base + [f"data.sampler.epoch_size={(args.steps + log) * bs}", f"training.log_interval={log}",
                       f"training.code_log_interval={10**6}"]
        batch = next(iter(make_loader(tmp / "build", batch_size=bs, val_split=0.0)))
        device = torch.device(args.device)
        print(f"preset {args.preset}: hidden {cfg0.model.hidden_dim}, {cfg0.model.num_layers}+"
              f"{cfg0.model.n_decoder_layers} layers, batch {bs}, {cfg0.training.mixed_precision}, "
              f"device {args.device}, N={batch['velocities'].shape[2]}, S={batch['velocities'].shape[1]}, "
              f"torch threads {torch.get_num_threads()}")
        ceiling = model_only(cfg0, batch, args.steps, device)
        print(f"{'setting':<34}{'clips/s':>10}{'loader wait':>13}{'vs model-only':>15}")
        print(f"{'model only (in-memory batch)':<34}{ceiling:>10.1f}{'-':>13}{'1.00x':>15}")
        for w in args.workers:
            cfg = from_dict({}, sets + [f"data.num_workers={w}"])
            cps, wait, peak = loop(cfg, tmp / "build", tmp / f"run{w}", steps=args.steps)
            extra = f"  peak {peak:.1f} GiB" if peak else ""
            print(f"{f'train loop, {w} loader workers':<34}{cps:>10.1f}{wait:>12.1%}{cps / ceiling:>14.2f}x{extra}")


if __name__ == "__main__":
    main()
