"""Training throughput (clips/s) of the real loop at several loader worker counts, next to
the model alone.

Writes synthetic tracks (N = 400 points, 20x20 grid), builds them, then prints
- the model alone: forward + loss + backward + AdamW on one batch held on the device (no
  loader): the ceiling the loop could reach;
- the real training loop (``tokenizer_train.train.train``: loader, forward, loss, backward,
  AdamW) at each ``--workers`` setting (default 0, auto, 2, 4, 8; ``auto`` is resolved by
  ``motion_data.workers`` for the device): its ``perf/clips_per_s`` and
  ``perf/loader_wait_share`` (time waiting for the next batch / wall time) from
  metrics.jsonl, the first log interval dropped as warm-up, and peak GPU memory.
Each setting is capped at ``--steps`` optimizer steps; settings left when ``--time-limit``
seconds have passed are skipped (and said so), so a GPU run finishes in under 2 minutes.

    python benchmarks/bench_train.py --device cpu --clips 64 --steps 4 --workers 0 auto   # tiny, on CPU
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
from motion_data.workers import AUTO, resolve_workers, usable_cores
from tokenizer_train.config import from_dict
from tokenizer_train.losses import Criterion
from tokenizer_train.model import MotionTokenizer
from tokenizer_train.model_inputs import model_kwargs
from tokenizer_train.train import autocast_for, train

PRESETS = {
    "default": [],
    "tiny": ["model.hidden_dim=32", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8"],  # tests
    "amplify": ["model.hidden_dim=768", "model.num_layers=2", "model.num_heads=8",
                "training.mixed_precision=bf16", "training.batch_size=256"],
}


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def model_only(cfg, batch, steps, device) -> tuple[float, float]:
    """(clips/s, peak GiB) of forward + loss + backward + AdamW on one batch on ``device``."""
    torch.manual_seed(0)
    _reset_peak(device)
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
    return steps * b["velocities"].shape[0] / (time.perf_counter() - t), _peak_gib(device)


def loop(cfg, data, out, device) -> tuple[float, float, float]:
    """(clips/s, loader-wait share, peak GiB) of the real loop, warm-up interval dropped."""
    _reset_peak(device)
    train(cfg, data, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "perf/clips_per_s" in r]
    perf = perf[1:] or perf  # the first interval holds the start-up
    return (float(np.mean([r["perf/clips_per_s"] for r in perf])),
            float(np.mean([r["perf/loader_wait_share"] for r in perf])), _peak_gib(device))


def _workers(v: str):
    if v == AUTO:
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes integers >= 0 or auto, got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--workers takes integers >= 0 or auto, got {v!r}")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model/batch setting")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per setting (the cap), after a warm-up "
                    "interval of steps // 3 that is dropped")
    ap.add_argument("--workers", type=_workers, nargs="+", default=[0, AUTO, 2, 4, 8],
                    help="loader worker counts to measure (integers or auto)")
    ap.add_argument("--clips", type=int, default=1000, help="synthetic clips to generate and build")
    ap.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--time-limit", type=float, default=110.0,
                    help="seconds after which the remaining settings are skipped (reported as skipped)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synth(tmp / "in", args.clips, seed=0)
        build([str(tmp / "in")], tmp / "build", progress=False)
        base = PRESETS[args.preset] + [f"training.device={args.device}", "data.val_split=0.0", "training.epochs=1"]
        if args.batch_size:
            base.append(f"training.batch_size={args.batch_size}")
        cfg0 = from_dict({}, base)
        bs = cfg0.training.batch_size
        log = max(1, args.steps // 3)  # the first log interval is warm-up and dropped
        sets = base + [f"data.sampler.epoch_size={(args.steps + log) * bs}", f"training.log_interval={log}",
                       f"training.code_log_interval={10**6}"]
        batch = next(iter(make_loader(tmp / "build", batch_size=bs, val_split=0.0)))
        print(f"preset {args.preset}: hidden {cfg0.model.hidden_dim}, {cfg0.model.num_layers}+"
              f"{cfg0.model.n_decoder_layers} layers, batch {bs}, {cfg0.training.mixed_precision}, "
              f"device {args.device}, N={batch['velocities'].shape[2]}, S={batch['velocities'].shape[1]}, "
              f"torch threads {torch.get_num_threads()}, usable cores {usable_cores()}, "
              f"{args.steps} steps per setting", flush=True)
        ceiling, peak = model_only(cfg0, batch, args.steps, device)
        print(f"{'setting':<34}{'clips/s':>10}{'loader wait':>13}{'vs model-only':>15}{'peak GPU GiB':>14}")
        print(f"{'model only (batch on the device)':<34}{ceiling:>10.1f}{'-':>13}{'1.00x':>15}{peak:>14.2f}", flush=True)
        for w in args.workers:
            n = resolve_workers(w, device.type)
            name = f"train loop, {w} workers" + (f" (= {n})" if w == AUTO else "")
            if time.perf_counter() - t_start > args.time_limit:
                print(f"{name:<34}  skipped: --time-limit {args.time_limit:g} s reached", flush=True)
                continue
            cfg = from_dict({}, sets + [f"data.num_workers={w}"])
            cps, wait, peak = loop(cfg, tmp / "build", tmp / f"run_{w}", device)
            print(f"{name:<34}{cps:>10.1f}{wait:>12.1%}{cps / ceiling:>14.2f}x{peak:>14.2f}", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
