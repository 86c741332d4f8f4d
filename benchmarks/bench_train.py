"""Training cost of the full-logits path (``training.decode_points=all``, what every run did
before masked decoding) next to the masked path (``masked``, the default), side by side in
one run, for each config.

Each (config, path) runs in a subprocess of its own, so that its peak memory is its own:
- train clips/s: ``perf/clips_per_s`` of the real loop (loader, forward, loss, backward,
  AdamW), the first log interval dropped as warm-up;
- val clips/s: ``perf/val_clips_per_s_epoch``, the validation pass with code information
  (9 decoder passes a batch);
- activation MB: the bytes autograd keeps for the backward pass of one training batch
  (tensors saved by the forward and the loss, each storage counted once);
- peak RSS GB (CPU) or peak CUDA GB: of the whole subprocess, imports included (~0.4 GB).
Ratios are masked / all of the same config in the same run.

    python benchmarks/bench_train.py --data BUILD                       # 1 epoch per setting
    python benchmarks/bench_train.py --data BUILD --configs recommended --max-steps 60
    python benchmarks/bench_train.py --device cuda --data BUILD         # on a GPU
Without ``--data`` a synthetic build of ``--clips`` clips is made (speed only, not quality).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (config file, extra --set)
    "base": ("configs/base.yaml", []),
    "base+filter": ("configs/base.yaml", ["data.static_filter.enable=true"]),
    "recommended": ("configs/recommended.yaml", []),
    "amplify": ("configs/amplify.yaml", []),
}
PATHS = ("all", "masked")


def activation_bytes(trainer, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one forward + loss (each storage once)."""
    import torch

    seen: dict = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss, *_ = trainer.forward_backward(batch, 0.5, True)
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(sum(seen.values()))


def child(args) -> dict:
    """One (config, path) setting: a 1-epoch training (or --max-steps), then its figures."""
    import numpy as np
    import torch

    from motion_data.build.folder import BuildDir
    from tokenizer_train.common import distributed as D
    from tokenizer_train.train import trainer as T
    from tokenizer_train.common.config import load_config
    from tokenizer_train.model.model_inputs import with_index
    from tokenizer_train.common.stop import StopSignals

    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    t0 = time.perf_counter()
    T.train(cfg, Path(args.data), out, progress=False)
    wall = time.perf_counter() - t0
    dev = torch.device(cfg.training.device if cfg.training.device != "auto" else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = (torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)  # kB -> GB on Linux
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r["perf/clips_per_s"] for r in rows if "perf/clips_per_s" in r]
    perf = perf[1:] or perf
    val = [r["perf/val_clips_per_s_epoch"] for r in rows if "perf/val_clips_per_s_epoch" in r]
    last = [r for r in rows if "val/code_info_bits_epoch" in r]
    with StopSignals() as stop:
        tr = T.Trainer(cfg, BuildDir(args.data), out / "probe", D.Dist(), False, False, stop)
    tr.train_loader.set_epoch(0)
    batch = next(iter(tr.train_loader))
    if cfg.training.decode_points == "masked":
        batch = with_index(batch, "decode_index", "mask", "eval_mask")
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    act = activation_bytes(tr, batch)
    return {"train_clips_per_s": float(np.mean(perf)), "val_clips_per_s": val[-1] if val else float("nan"),
            "activation_mb": act / 1e6, "peak_gb": peak, "wall_s": wall, "steps": rows[-1]["step"],
            "val_code_info_bits": last[-1]["val/code_info_bits_epoch"] if last else float("nan"),
            "cuda": dev.type == "cuda"}


def run_setting(name, path, data, tmp, args) -> dict:
    cfg_file, sets = CONFIGS[name]
    sets = sets + [f"training.decode_points={path}", "training.epochs=1", f"training.device={args.device}",
                   "training.code_log_interval=1000000"] + args.set
    if args.max_steps:
        from tokenizer_train.common.config import load_config

        bs = load_config(REPO / cfg_file, sets).training.batch_size
        sets.append(f"data.sampler.epoch_size={args.max_steps * bs}")
    out = tmp / f"{name}_{path}".replace("+", "_")
    cmd = [sys.executable, __file__, "--child", "--config", str(REPO / cfg_file), "--data", str(data), "--out",
           str(out), "--set", *sets]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode:
        raise SystemExit(f"{name} ({path}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a build folder (python -m preprocess build-shards); default: a synthetic build")
    ap.add_argument("--clips", type=int, default=600, help="synthetic clips when --data is not given")
    ap.add_argument("--configs", default="base,base+filter,recommended,amplify",
                    help=f"comma-separated settings among {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="cap each training at this many optimizer steps (0: one whole epoch)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every setting")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {', '.join(bad)}; choose among {', '.join(CONFIGS)}")
    import torch

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from motion_data.build.build_shards import build
            from motion_data.sources.synth import write_synth

            write_synth(tmp / "in", args.clips, seed=0)
            build([str(tmp / "in")], tmp / "build", progress=False)
            data = tmp / "build"
        print(f"data {data}; device {args.device}; torch threads {torch.get_num_threads()}; "
              f"cores {os.cpu_count()}; load {os.getloadavg()[0]:.2f}; "
              f"{'max ' + str(args.max_steps) + ' steps' if args.max_steps else '1 epoch'} per setting", flush=True)
        mem = "peak CUDA GB" if args.device == "cuda" else "peak RSS GB"
        head = (f"{'config':<13}{'path':<8}{'train clips/s':>14}{'val clips/s':>12}{'activ. MB':>11}{mem:>14}"
                f"{'wall s':>8}{'code info':>10}")
        print(head, flush=True)
        for name in names:
            res = {}
            for path in PATHS:
                r = res[path] = run_setting(name, path, data, tmp, args)
                print(f"{name:<13}{path:<8}{r['train_clips_per_s']:>14.1f}{r['val_clips_per_s']:>12.1f}"
                      f"{r['activation_mb']:>11.1f}{r['peak_gb']:>14.2f}{r['wall_s']:>8.0f}"
                      f"{r['val_code_info_bits']:>10.3f}", flush=True)
            a, m = res["all"], res["masked"]
            print(f"{name:<13}{'ratio':<8}{m['train_clips_per_s'] / a['train_clips_per_s']:>13.2f}x"
                  f"{m['val_clips_per_s'] / a['val_clips_per_s']:>11.2f}x"
                  f"{m['activation_mb'] / a['activation_mb']:>10.2f}x{m['peak_gb'] / a['peak_gb']:>13.2f}x",
                  flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
