"""tokenize: write each clip's code ids with a trained tokenizer (what a dynamics model consumes).

  python -m tokenizer_train tokenize --run RUN --data BUILD --out codes.parquet

The Parquet file has one row per clip of the build, in manifest order: clip_id (str),
split (train | val, under the run's data.val_split) and codes (list of int32, one code id
per time step). The schema metadata records the run, checkpoint, FSQ levels and
codebook size. Uses RUN/best.pt unless --checkpoint last.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from motion_data.common.atomic import atomic_path
from motion_data.build.folder import BuildDir
from motion_data.common.errors import UserError, one_line
from motion_data.read.loader import MANIFEST_COLUMNS, ClipDataset
from motion_data.read.sampler import SequentialBatchSampler
from motion_data.read.split import split_manifest

from tokenizer_train.model.checkpoint import load_model
from tokenizer_train.common.distributed import pick_device
from tokenizer_train.model.model_inputs import model_kwargs


def add_arguments(p):
    p.add_argument("--run", required=True, help="training run folder (holds best.pt / last.pt)")
    p.add_argument("--data", required=True, help="build folder whose clips to tokenize")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--batch-size", type=int, default=256, help="clips per forward pass (default: 256)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model")


def _whole_batch(batch):
    return batch  # ClipDataset.__getitems__ already returns the batch dict


@torch.no_grad()
def tokenize(run_dir, data_dir, out_path, which="best", batch_size=256, num_workers=0, device="cpu") -> Path:
    device = torch.device(device)
    model, cfg, meta = load_model(run_dir, which, device)
    build = BuildDir(data_dir)
    build.check_compatible(W=meta["W"], N=meta["N"], what=f"the run {run_dir}")
    man = build.manifest(MANIFEST_COLUMNS)
    C = len(man["clip_id"])
    _, val_rows = split_manifest(man, cfg.data.val_split, build.T)
    split = np.full(C, "train", dtype=object)
    split[val_rows] = "val"
    ds = ClipDataset(build.root, man, cfg.data.static_filter)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=SequentialBatchSampler(np.arange(C), batch_size),
                                     collate_fn=_whole_batch, num_workers=num_workers)
    ids, codes = [], []
    for batch in tqdm(dl, desc="tokenize", unit="batch", dynamic_ncols=True):
        if not batch["clip_id"]:
            continue
        kw = {k: v.to(device) for k, v in model_kwargs(batch).items()}
        c = model.encode(batch["velocities"].to(device), **kw)["codes"]
        ids.extend(batch["clip_id"])
        codes.extend(c.cpu().numpy().astype(np.int32))
    order = {cid: i for i, cid in enumerate(man["clip_id"])}
    table = pa.table({"clip_id": pa.array(ids, pa.string()),
                      "split": pa.array([split[order[i]] for i in ids], pa.string()),
                      "codes": pa.array([c.tolist() for c in codes], pa.list_(pa.int32()))})
    table = table.replace_schema_metadata({"tokenizer": json.dumps({
        "run": str(run_dir), "checkpoint": which, "fsq_levels": meta["levels"],
        "codebook_size": int(np.prod(meta["levels"])), "W": meta["W"], "N": meta["N"]})})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def run(args) -> int:
    try:
        out = tokenize(args.run, args.data, args.out, args.checkpoint, args.batch_size, args.num_workers,
                       pick_device(args.device))
    except (FileNotFoundError, ValueError, KeyError) as e:  # a UserError passes; the others become one
        if isinstance(e, UserError):
            raise
        raise UserError(one_line(e)) from None  # the dispatcher prints one line
    print(f"wrote {out}", file=sys.stderr)
    return 0
