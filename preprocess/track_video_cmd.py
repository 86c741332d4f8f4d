"""Track a point grid through videos with OpenCV's pyramidal Lucas-Kanade tracker.

A grid of --grid x --grid points is placed at the start of every window (--window frames,
one starting every --stride frames) and tracked frame to frame with
cv2.calcOpticalFlowPyrLK; visibility comes from LK's status, a forward-backward check
(--fb-threshold px) and the frame border. Writes one CoTracker-style track file per video,
OUT/<video stem>.npz, holding tracks (B, window, N, 2) pixels, visibility (B, window, N),
image_size (H, W) and start_frame (B,), which build-shards --format tracks reads (use the
same --window: each stored sequence is exactly one window). Needs opencv-python-headless.

Example: python -m preprocess track-video /usr/share/doc/opencv-doc/examples/data/vtest.avi --out tracks/
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from motion_data.common.errors import DataError, SettingError
from motion_data.sources.video import TrackConfig, track_video, write_track_file


def add_arguments(p):
    d = TrackConfig()
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files OpenCV can decode")
    p.add_argument("--out", required=True, help="output folder for the .npz track files")
    p.add_argument("--window", type=int, default=d.window, help="frames per window (default: %(default)s)")
    p.add_argument("--stride", type=int, default=d.stride, help="frames between window starts (default: %(default)s)")
    p.add_argument("--grid", type=int, default=d.grid, help="points per side of the query grid (default: %(default)s)")
    p.add_argument("--max-frames", type=int, default=None, help="read at most this many frames of each video")
    p.add_argument("--win-size", type=int, default=d.win_size, help="LK search window in px (default: %(default)s)")
    p.add_argument("--max-level", type=int, default=d.max_level, help="LK pyramid levels (default: %(default)s)")
    p.add_argument("--fb-threshold", type=float, default=d.fb_threshold,
                   help="forward-backward error in px above which a point is lost (default: %(default)s)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="stop at the first unreadable video, or skip it and report it (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _out_names(videos):
    """OUT file name per video: its stem, plus a hash of the path when stems collide."""
    stems = [Path(v).stem for v in videos]
    names = []
    for v, s in zip(videos, stems):
        if stems.count(s) > 1:
            s = f"{s}-{hashlib.sha1(str(v).encode()).hexdigest()[:8]}"
        names.append(f"{s}.npz")
    return names


def run(args) -> int:
    try:
        cfg = TrackConfig(window=args.window, stride=args.stride, grid=args.grid, max_frames=args.max_frames,
                          win_size=args.win_size, max_level=args.max_level, fb_threshold=args.fb_threshold)
    except ValueError as e:
        raise SettingError(str(e)) from None
    from tqdm import tqdm

    out = Path(args.out)
    skipped = []
    videos = list(args.videos)
    for video, name in tqdm(list(zip(videos, _out_names(videos))), unit="video", desc="track-video",
                            disable=args.no_progress or len(videos) < 2):
        try:
            d = track_video(video, cfg, progress=not args.no_progress)
        except DataError as e:
            if args.on_error == "fail":
                raise  # a UserError: one line from the dispatcher (exit 2)
            skipped.append(str(e))
            continue
        path = write_track_file(out / name, d)
        print(f"{video}: {d['tracks'].shape[0]} windows of {cfg.window} frames, "
              f"{d['visibility'].mean():.1%} visible -> {path}")
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    return 0
