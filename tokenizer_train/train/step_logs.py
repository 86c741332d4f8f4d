"""The figures of a logging step: ``train/*_step`` scalars and code statistics.

Both are collective under DDP (every rank calls them at the same step); apart from checkpoint
saves, they are the only places a training step reads device values on the host.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from tokenizer_train.common import distributed as D
from tokenizer_train.evaluate import metrics as M
from tokenizer_train.evaluate.metrics import Sums
from tokenizer_train.evaluate.validate import train_code_info


@dataclass
class Pace:
    """Since the last log step: seconds spent waiting for the loader, the start, clips."""
    wait: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    clips: int = 0


def step_scalars(tr, step_sums: Sums, micro, grad_norm, pace: Pace) -> dict:
    """The ``train/*_step`` scalars of a log step (the host reads the sums here); ``micro``:
    the step's last ``Trainer.forward_backward``."""
    elapsed = max(time.perf_counter() - pace.t0, 1e-9)  # before the reduce: it waits for the device and ranks
    r = step_sums.reduced(tr.device)
    extra = {} if micro.soft is None else {"train/code_entropy_soft_step": float(micro.soft)}
    return {**M.step_scalars(r),
            "train/lr": tr.scheduler.get_last_lr()[0],
            "train/grad_norm": float(grad_norm),
            "train/code_entropy_weight": micro.lam,
            "train/quant_input_tanh_scale": tr.model.shaping.scale_value(),
            "perf/loader_wait_share": pace.wait / elapsed,
            "perf/clips_per_s": pace.clips * tr.dist.world_size / elapsed,
            **extra,
            "train/quant_input_std_step": float(micro.out["quant_in"].detach().float().std())}


def code_scalars(tr, pg, step_codes: list, batch, out) -> tuple[dict, dict]:
    """The code statistics of a code-log step: this rank's and all ranks' (``*_global``)."""
    codes = torch.cat([c.reshape(-1, tr.L) for c in step_codes])
    zc = tr.model.zero_codes(tr.S).cpu().numpy()
    local, seen = codes.cpu().numpy(), pg.seen.cpu().numpy()
    gathered = D.gather_codes(codes).reshape(-1, tr.L)
    pg.seen_g = D.all_reduce_any(pg.seen_g | seen, tr.device)
    cs, ch = M.code_scalars("train", "step", local, tr.levels, zc, seen)
    gs, gh = M.code_scalars("train", "step", gathered, tr.levels, zc, pg.seen_g, tag_suffix="_global")
    scalars = cs | gs
    scalars["train/code_info_bits_step"] = train_code_info(tr.model, batch, out["quantized"], tr.device, tr.places)
    if tr.debug_codes:  # each rank's own codes: a test recomputes the *_global statistics
        with open(tr.out_dir / f"debug_codes_rank{tr.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": pg.step, "codes": local.tolist()}) + "\n")
    return scalars, ch | gh
