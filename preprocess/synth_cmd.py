"""Write synthetic track files that look like real robot/video tracks.

Each clip tracks a grid of points over a mostly static background (tracker noise only),
0-3 rigid objects that translate and rotate, an arm-like articulated mover (2-3 links) in
most clips, optional camera shake, and occlusion (points behind nearer movers or outside the
frame are invisible). Files are CoTracker-style .npz track files (tracks (B,T,N,2) pixels,
visibility, image_size, start_frame) that build-shards --format tracks reads. With the
defaults the centre class holds ~94% of valid labels before filtering and ~60% after the
default static filter (p95@0.04, min_keep 16). Deterministic given --seed.

OUT must be new or empty: build-shards reads every track file of a folder, so synth never
adds its files to others. --overwrite replaces earlier synth output in OUT (synth-NNNNNN.npz,
synth.json); a folder holding any other file is refused even then, and nothing is removed.
"""
from __future__ import annotations

from motion_data.common.errors import UserError

import json
import os

from motion_data.common.atomic import atomic_open
from motion_data.sources.synth import SYNTH_JSON, SynthConfig, config_dict, prepare_out, write_synth


def add_arguments(p):
    d = SynthConfig()
    p.add_argument("--out", required=True, help="output folder for synth-NNNNNN.npz files")
    p.add_argument("--clips", type=int, required=True, help="number of clips to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--clips-per-file", type=int, default=100, help="clips per .npz file (default: %(default)s)")
    p.add_argument("--grid", type=int, default=d.grid, help="points per side of the query grid (default: %(default)s)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per clip (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="side of the square frame in pixels (default: %(default)s)")
    p.add_argument("--camera-shake", type=float, default=d.camera_shake,
                   help="camera random-walk std in reference px (128-px frame) per frame (default: %(default)s)")
    p.add_argument("--shake-prob", type=float, default=d.shake_prob,
                   help="share of clips with camera shake (default: %(default)s)")
    p.add_argument("--occlusion", type=float, default=d.dropout_fraction,
                   help="share of points with a tracker dropout (invisible for a few frames), on top of "
                        "occlusion by movers and the frame border (default: %(default)s)")
    p.add_argument("--arm-prob", type=float, default=d.arm_prob,
                   help="share of clips with an articulated arm (default: %(default)s)")
    p.add_argument("--noise", type=float, default=d.noise_std,
                   help="tracker noise std in reference px (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove earlier synth output in OUT (synth-NNNNNN.npz, synth.json) first; other files "
                        "are never removed, and a folder holding any is refused")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    try:
        cfg = SynthConfig(grid=args.grid, frames=args.frames, image_size=args.image_size,
                          camera_shake=args.camera_shake, shake_prob=args.shake_prob,
                          dropout_fraction=args.occlusion, arm_prob=args.arm_prob, noise_std=args.noise)
        if args.clips < 1 or args.clips_per_file < 1:
            raise ValueError(f"--clips and --clips-per-file must be >= 1, got {args.clips}, {args.clips_per_file}")
    except ValueError as e:
        raise UserError(str(e)) from None  # one line from the dispatcher (exit 2)
    removed = prepare_out(args.out, overwrite=args.overwrite)  # UserError: refused, nothing removed
    if removed:
        print(f"removed {len(removed)} earlier synth files from {args.out}")
    from tqdm import tqdm

    with tqdm(total=args.clips, unit="clip", desc="synth", disable=args.no_progress) as bar:
        paths = write_synth(args.out, args.clips, args.seed, cfg, args.clips_per_file, progress=bar.update)
    meta = {"command": "synth", "clips": args.clips, "seed": args.seed, "clips_per_file": args.clips_per_file,
            "files": [os.path.basename(p) for p in paths], "config": config_dict(cfg)}
    with atomic_open(os.path.join(args.out, SYNTH_JSON), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.clips} clips in {len(paths)} files to {args.out}")
    return 0
