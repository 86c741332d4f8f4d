"""decode: code ids back to the motion the decoder predicts (per clip, step and point).

  python -m tokenizer_train decode --run RUN --codes codes.parquet --out decoded.npz [--data BUILD]

Reads the Parquet of tokenize (columns clip_id and codes) and writes one npz with, for
C clips, S = T-1 steps and N points:
  clip_id       (C,) str      the clips, in the Parquet's row order
  classes       (C, S, N) int16    predicted displacement class (row * W + col; centre = no motion)
  displacement  (C, S, N, 2) float32  that class's (dx, dy) in pixels of the reference frame
  confidence    (C, S, N) float32  softmax probability of the predicted class
  start_pos     (C, N, 2) float32  each point's first-frame position, reference px (only with --data)
  W, ref_size   ()  int     the window (W*W classes) and, with --data, the reference frame size
Predicted tracks follow as start_pos + cumsum(displacement, axis=1).

--data (the build the codes were made from) is needed when the run uses
model.point_pos_enc (its decoder reads each point's start position, looked up by clip id);
otherwise it is optional and only adds start_pos. Uses RUN/best.pt unless --checkpoint last.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from motion_data.common.atomic import atomic_open
from motion_data.build.folder import BuildDir
from motion_data.read.ranges import ranges_for
from motion_data.common.errors import DataError, SettingError, one_line

from tokenizer_train.use.api import load_tokenizer
from motion_data.read.clips import read_clips

def add_arguments(p):
    p.add_argument("--run", required=True, help="training run folder (holds best.pt / last.pt)")
    p.add_argument("--codes", required=True, help="Parquet file written by python -m tokenizer_train tokenize")
    p.add_argument("--out", required=True, help="output .npz file (arrays listed above)")
    p.add_argument("--data", default=None,
                   help="build folder the codes came from; needed when the run uses model.point_pos_enc "
                        "(start positions by clip id), otherwise optional (adds start_pos)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="clips per decoder pass; memory grows with it, about 40 MB a clip at 400 points (default: 32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the model (auto: CUDA when available)")


def read_codes(path) -> tuple[list[str], np.ndarray]:
    """(clip ids, codes ``(C, L)`` int64) of a ``tokenize`` Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["clip_id", "codes"]).to_pydict()
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise DataError(f"{path}: cannot read codes ({one_line(e)}); write it with "
                          f"python -m tokenizer_train tokenize") from None
    if not t["clip_id"]:
        raise DataError(f"{path}: holds no clips; tokenize a build that has clips")
    lengths = {len(c) for c in t["codes"]}
    if len(lengths) > 1:
        raise DataError(f"{path}: clips have different code counts {sorted(lengths)}; tokenize one build with one run")
    return list(t["clip_id"]), np.asarray(t["codes"], np.int64).reshape(len(t["clip_id"]), -1)


def decode_codes(run_dir, codes_path, out_path, data_dir=None, which="best", batch_size=32, device="auto",
                 progress=True) -> Path:
    """Write the npz of the module docstring (memory bounded by one batch); returns its path."""
    tok = load_tokenizer(run_dir, which, device)
    ids, codes = read_codes(codes_path)
    if codes.shape[1] % tok.tokens_per_step or (codes.size and (codes.min() < 0 or codes.max() >= tok.codebook_size)):
        raise DataError(f"{codes_path}: codes do not fit the run {run_dir} ({tok.tokens_per_step} tokens per step, "
                          f"ids in [0, {tok.codebook_size})); decode with the run that tokenized them")
    if tok.needs_start_pos and data_dir is None:
        raise DataError(f"{run_dir}: the run uses model.point_pos_enc, its decoder needs each point's start "
                          f"position: pass --data BUILD (the build the codes were made from)")
    C, S, N = len(ids), codes.shape[1] // tok.tokens_per_step, tok.N
    build = rows = None
    if data_dir is not None:
        build = BuildDir(data_dir)
        build.check_compatible(N=N, what=f"the run {run_dir}")
        rows = build.rows_of(ids)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_path.name}.decoding-"
    for old in out_path.parent.glob(prefix + "*"):  # a killed decode's arrays: only ours, by their exact prefix
        shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=prefix) as tmp:
        # every output array is a .npy file filled chunk by chunk (memory-mapped: memory stays
        # bounded by one chunk), then the files are stored into the npz
        big = {"classes": ((C, S, N), np.int16), "displacement": ((C, S, N, 2), np.float32),
               "confidence": ((C, S, N), np.float32)}
        if build is not None:
            big["start_pos"] = ((C, N, 2), np.float32)
        arr = {k: np.lib.format.open_memmap(Path(tmp) / f"{k}.npy", "w+", dt, shape) for k, (shape, dt) in big.items()}
        fds = ranges_for(build.root if build is not None else Path("."))  # one descriptor per local shard
        try:
            for lo in tqdm(range(0, C, batch_size), desc="decode", unit="batch", dynamic_ncols=True,
                           disable=not progress):
                hi = min(C, lo + batch_size)
                start = None
                if build is not None:
                    arr["start_pos"][lo:hi] = read_clips(build, rows[lo:hi], fds)[0][:, 0]
                    start = arr["start_pos"][lo:hi] if tok.needs_start_pos else None
                d = tok.decode(codes[lo:hi], start, logits=False)
                arr["classes"][lo:hi] = d.classes.cpu().numpy()
                arr["displacement"][lo:hi] = d.displacement.cpu().numpy()
                arr["confidence"][lo:hi] = d.confidence.cpu().numpy()
        finally:
            fds.close()
        for a in arr.values():
            a.flush()
        small = {"clip_id": np.asarray(ids, dtype=str), "W": np.int64(tok.W)}
        if build is not None:
            small["ref_size"] = np.int64(build.ref_size)
        with atomic_open(out_path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for k, v in small.items():
                with z.open(f"{k}.npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, v, allow_pickle=False)
            for k in big:
                z.write(Path(tmp) / f"{k}.npy", f"{k}.npy")
        del arr
    return out_path


def run(args) -> int:
    if args.batch_size < 1:
        raise SettingError(f"--batch-size must be >= 1, got {args.batch_size}")
    decode_codes(args.run, args.codes, args.out, args.data, args.checkpoint, args.batch_size, args.device)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
