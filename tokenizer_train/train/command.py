"""Train a motion tokenizer on a build folder (also under torchrun).

  python -m tokenizer_train train --config configs/base.yaml --data BUILD --out RUN
  torchrun --nproc-per-node 2 -m tokenizer_train train --config ... --data BUILD --out RUN
  python -m tokenizer_train train --resume RUN          # continue exactly where RUN stopped

RUN receives config.yaml (the resolved config), run.json, metrics.jsonl (one JSON object per
log event), TensorBoard event files (tensorboard --logdir RUN, or the folder above several
runs to compare them: the config is logged as text, and as hparams with the run's final
metrics), last.pt (and last.prev.pt, the one before it) and best.pt (lowest val/loss_epoch).

RUN must be new or empty. A folder that holds a run is continued with --resume RUN or
replaced with --overwrite (that run's files are removed first, nothing else); a folder
that holds other files is refused.

Interruptions: Ctrl-C or SIGTERM finishes the current step, saves last.pt and prints the
command that resumes (exit 130 or 143; under torchrun every rank stops at the same step); a
second Ctrl-C quits at once. A run killed at any moment resumes with --resume RUN from its
newest readable checkpoint (last.pt, else last.prev.pt); every rank's RNG state, loss sums
and code counts are in it, so on CPU with the same world size the continuation is bit-exact.
What the killed run logged after that checkpoint (metrics.jsonl rows, TensorBoard events)
is dropped on resume and logged again. A run killed before its first checkpoint starts
again from step 0 with --resume RUN (the config and build it recorded), its old logs removed.
Override any config key with --set KEY=VALUE ...; an unknown key is an error.
BUILD may be a URL (s3://, gs://, https://; the cloud extra): shards are read by byte range.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from motion_data.common.errors import UserError, one_line
from motion_data.common.storage import location

from tokenizer_train.common import distributed as D
from tokenizer_train.common.config import add_set_argument, load_config
from tokenizer_train.common.stop import Stopped
from tokenizer_train.model import checkpoint as ckpt
from tokenizer_train.train.trainer import Hooks, train


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML config (default: built-in defaults; with --resume: RUN/config.yaml)")
    p.add_argument("--data", help="build folder written by python -m preprocess build-shards "
                                  "(with --resume: the one recorded in RUN/run.json)")
    p.add_argument("--out", help="run folder to create: absent or empty, or a run with --overwrite (with --resume: RUN)")
    add_set_argument(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt: model, optimizer, scheduler, "
                   "grad scaler, sampler position, RNG states, step and epoch (a run stopped before its first "
                   "checkpoint starts again from step 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in --out although it holds a run: that run's files (checkpoints, logs, "
                        "config.yaml, run.json, event files) are removed first; other files are kept")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug-codes", action="store_true",
                   help="each rank also appends its code ids of every code-log step to RUN/debug_codes_rank<r>.jsonl "
                        "(to check the *_global statistics)")


def run(args) -> int:
    cfg, data_dir, out_dir, resume, overwrite = _resolve(args)  # a UserError: one line from the dispatcher
    dist = D.init(cfg.training.device)
    try:
        train(cfg, data_dir, out_dir, resume=resume, dist=dist, overwrite=overwrite, hooks=Hooks(args.debug_codes),
              progress=not args.no_progress)
    # the user's errors (UserError) are printed by the dispatcher as one line; anything else
    # raised while training is a bug and keeps its traceback
    except Stopped as e:  # checkpoint saved: one line that says how to continue
        if dist.is_main:
            print(f"python -m tokenizer_train train: {e.message()}", file=sys.stderr, flush=True)
        D.barrier()  # no rank exits (torchrun then ends the others) before rank 0 has said it
        return e.exit_code
    finally:
        D.cleanup()
    return 0


def _resolve(args):
    """(config, data dir, run dir, resume?, overwrite?) from the command line and, on resume,
    the run; a run stopped before its first checkpoint is started again (overwrite)."""
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise UserError("--out must be omitted or equal to --resume RUN")
        if args.overwrite:
            raise UserError("--overwrite starts afresh and --resume continues: give one of them")
        started = ckpt.has_last(run_dir)
        if not started and not (run_dir / "run.json").exists():
            raise UserError(f"{run_dir}: nothing to resume (no last.pt, no run.json); start a run "
                                    f"there with --data BUILD --out {run_dir} (add --overwrite if it holds one)")
        try:
            recorded = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{run_dir / 'run.json'}: unreadable ({one_line(e)})") from None
        cfg = load_config(args.config or run_dir / "config.yaml", args.set)
        if not started and int(os.environ.get("RANK", "0")) == 0:
            print(f"{run_dir}: stopped before its first checkpoint; starting it again from step 0", file=sys.stderr)
        return cfg, location(args.data or recorded["data"]), run_dir, started, not started
    if not args.data or not args.out:
        raise UserError("--data and --out are required (or --resume RUN)")
    return load_config(args.config, args.set), location(args.data), Path(args.out), False, args.overwrite
