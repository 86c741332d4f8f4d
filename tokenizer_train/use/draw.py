"""draw: a picture of one clip: its tracks, its labels and (with --run) the predicted motion.

  python -m tokenizer_train draw --data BUILD [--clip CLIP_ID] [--run RUN] --out clip.png
  python -m tokenizer_train draw --data BUILD --run RUN --frame first_frame.jpg --out clip.gif

Shards hold positions and visibility, not images: the clip is drawn over --frame (the clip's
first video frame, stretched to the reference frame) when given, otherwise over a blank
canvas of the reference size (ref_size x ref_size px, the frame the tracks are measured in).

PNG (whole clip): observed tracks (blue, visible frames only), the label path of each point
(green: its start plus the sum of its ground-truth displacement classes) and, with --run,
the predicted path (red, dashed: start plus the sum of the decoder's predicted classes).
GIF (one frame per step): the points at that step, the step's ground-truth displacement
(green arrow) and the predicted one (red arrow), over the tracks so far. Arrows are drawn
3 times their length (ARROW_SCALE) in px so that one-pixel steps are visible.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from motion_data.common.atomic import atomic_path
from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError, SettingError, one_line
from motion_data.common.labels import class_offsets, labels_from_positions, step_valid
from motion_data.read.split import split_manifest

from tokenizer_train.common.config import DataConfig
from motion_data.read.clips import read_clips

ARROW_SCALE = 3.0
DEFAULT_VAL_SPLIT = DataConfig().val_split  # the trainer's default, for builds drawn without a run


@dataclass(frozen=True)
class Picture:
    """How a clip is drawn: over ``frame`` (an image path, or an RGB array for a comparison;
    None: a blank canvas), ``size`` px wide and high, a GIF at ``fps`` frames per second."""
    frame: object = None
    size: int = 512
    fps: float = 4.0


@dataclass(frozen=True)
class CheckpointChoice:
    """Which checkpoint of a run to draw with (``best`` or ``last``) and where to run it
    (``auto``: CUDA when available, ``cpu`` or ``cuda``)."""
    which: str = "best"
    device: str = "auto"


def add_arguments(p):
    p.add_argument("--data", required=True, help="build folder (python -m preprocess build-shards output)")
    p.add_argument("--clip", default=None,
                   help="clip id to draw (default: the first validation clip, under the run's data.val_split "
                        "with --run, else --val-split)")
    p.add_argument("--run", default=None, help="training run folder: also draw the motion its decoder predicts "
                                               "from the clip's codes")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of --run "
                                                                                  "(default: best)")
    p.add_argument("--out", required=True, help="output file: .png (the whole clip) or .gif (one frame per step)")
    p.add_argument("--compare", nargs="+", metavar="[NAME=]RUN",
                   help="instead of --run: one panel per run side by side (.png), the true and the decoded motion of "
                        "the clip's moving points (the evaluation mask's), e.g. baseline=runs/base recommended=runs/rec")
    p.add_argument("--frame", default=None,
                   help="image of the clip's first video frame to draw over (any size; stretched to the reference "
                        "frame); default: a blank canvas of the reference size, since shards hold no images")
    p.add_argument("--size", type=int, default=512, help="picture width and height in pixels (default: 512)")
    p.add_argument("--fps", type=float, default=4.0, help="GIF frames per second (default: 4)")
    p.add_argument("--val-split", type=float, default=None,
                   help=f"validation share used to pick the default clip without --run (default: "
                        f"{DEFAULT_VAL_SPLIT}, the trainer's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the model with --run (auto: CUDA when available)")


def pick_clip(build: BuildDir, clip_id: str | None, val_split: float) -> int:
    """Manifest row of ``clip_id``, or of the first validation clip (the first clip when none is held out)."""
    if clip_id is not None:
        return int(build.rows_of([clip_id])[0])
    _, val = split_manifest(build.manifest(["split_group", "start_frame"]), val_split, build.T)
    return int(val[0]) if len(val) else 0


def clip_motion(build: BuildDir, row: int, tok=None) -> dict:
    """Arrays to draw: positions, visibility, valid steps, labels and their displacement px, and
    with ``tok`` (an ``api.Tokenizer``) the predicted classes and displacement px."""
    pos, vis, _ = read_clips(build, [row])
    pos, vis = pos[0], vis[0]
    labels = labels_from_positions(pos, build.W, build.ref_size, build.label_rule)
    out = {"pos": pos, "vis": vis, "valid": step_valid(vis), "labels": labels,
           "label_disp": class_offsets(build.W)[labels]}
    if tok is not None:
        d = tok.decode(tok.encode(pos), pos[0])
        out["pred"] = d.classes.cpu().numpy()
        out["pred_disp"] = d.displacement.cpu().numpy()
    return out


def _paths(start, disp):
    """``(T, N, 2)`` start plus the running sum of per-step displacements ``(S, N, 2)``."""
    return np.concatenate([start[None], start[None] + np.cumsum(disp, axis=0)], axis=0)


def _background(ax, frame, ref: int):
    if frame is not None:
        ax.imshow(frame, extent=(0, ref, ref, 0), interpolation="bilinear")
    else:
        ax.set_facecolor("white")
    ax.set_xlim(0, ref)
    ax.set_ylim(ref, 0)  # image rows grow downwards
    ax.set_xticks([])
    ax.set_yticks([])


def _read_frame(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read the frame image ({one_line(e)}); pass a PNG or JPEG "
                        f"or leave --frame out for a blank canvas") from None


BAND = 44  # px above the image for the title and the legend, so that neither covers a point


def _figure(size: int, panels: int = 1):
    """A figure of ``panels`` square image axes side by side under the title/legend band."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dpi = 100
    fig = plt.figure(figsize=(panels * size / dpi, (size + BAND) / dpi), dpi=dpi)
    axes = [fig.add_axes((i / panels, 0, 1 / panels, size / (size + BAND))) for i in range(panels)]
    return fig, (axes[0] if panels == 1 else axes), plt


def _legend(fig, m: dict, points: str):
    """A legend of exactly what is drawn (in the band above the image)."""
    from matplotlib.lines import Line2D

    items = [(Line2D([], [], ls="", marker="o", ms=3, color="black"), points),
             (Line2D([], [], color="tab:blue"), "observed tracks"),
             (Line2D([], [], color="tab:green"), "label motion")]
    if "pred_disp" in m:
        if np.abs(m["pred_disp"]).any():
            items.append((Line2D([], [], color="tab:red", ls="--"), "predicted motion"))
        else:
            items.append((Line2D([], [], ls=""), "predicted: no motion anywhere"))
    fig.legend(*zip(*items), loc="upper center", bbox_to_anchor=(0.5, 1.0 - 18 / fig.bbox.height), ncol=len(items),
               fontsize=7, frameon=False, handlelength=1.5, columnspacing=1.0)


def _title(fig, text: str):
    return fig.text(0.5, 1.0 - 3 / fig.bbox.height, text, ha="center", va="top", fontsize=7)


def draw_png(m: dict, path, ref: int, title: str, frame=None, size: int = 512):
    fig, ax, plt = _figure(size)
    try:
        _background(ax, frame, ref)
        obs = np.where(m["vis"][..., None], m["pos"], np.nan)
        ax.plot(obs[..., 0], obs[..., 1], color="tab:blue", lw=0.8, alpha=0.6)
        lab = _paths(m["pos"][0], m["label_disp"])
        ax.plot(lab[..., 0], lab[..., 1], color="tab:green", lw=0.9, alpha=0.8)
        if "pred_disp" in m:
            pred = _paths(m["pos"][0], m["pred_disp"])
            ax.plot(pred[..., 0], pred[..., 1], color="tab:red", lw=0.9, ls="--", alpha=0.8)
        ax.scatter(m["pos"][0, :, 0], m["pos"][0, :, 1], s=4, color="black", zorder=3)
        _title(fig, title)
        _legend(fig, m, "start points")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def draw_gif(m: dict, path, ref: int, title: str, frame=None, size: int = 512, fps: float = 4.0, progress=True):
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, ax, plt = _figure(size)
    S, N = m["labels"].shape
    obs = np.where(m["vis"][..., None], m["pos"], np.nan)
    _legend(fig, m, "points at this step")
    head = _title(fig, title)
    try:
        bar = tqdm(total=S, desc="draw", unit="frame", dynamic_ncols=True, disable=not progress)

        def step(t):
            ax.clear()
            _background(ax, frame, ref)
            ax.plot(obs[: t + 2, :, 0], obs[: t + 2, :, 1], color="tab:blue", lw=0.7, alpha=0.5)
            p, ok = m["pos"][t], m["valid"][t]
            ax.scatter(p[:, 0], p[:, 1], s=5, color="black", zorder=3)
            d = m["label_disp"][t] * ARROW_SCALE
            ax.quiver(p[ok, 0], p[ok, 1], d[ok, 0], d[ok, 1], color="tab:green", angles="xy", scale_units="xy",
                      scale=1, width=0.004)
            if "pred_disp" in m:
                d = m["pred_disp"][t] * ARROW_SCALE
                ax.quiver(p[:, 0], p[:, 1], d[:, 0], d[:, 1], color="tab:red", angles="xy", scale_units="xy",
                          scale=1, width=0.003, alpha=0.8)
            head.set_text(f"{title}  step {t + 1}/{S}")

        def frame_done(t):
            step(t)
            bar.update(1)

        # init_func: matplotlib would otherwise draw frame 0 once more to initialise
        anim = FuncAnimation(fig, frame_done, frames=S, init_func=lambda: step(0), interval=1000 / fps)
        with atomic_path(path) as tmp:
            named = tmp.with_name(tmp.name + ".gif")  # Pillow picks the format by the extension
            try:
                anim.save(named, writer=PillowWriter(fps=fps), dpi=100)
                os.replace(named, tmp)
            finally:
                named.unlink(missing_ok=True)
        bar.close()
    finally:
        plt.close(fig)


def moving_points(build: BuildDir, row: int) -> np.ndarray:
    """``(N,)`` bool: the clip's points the build's recorded filter keeps (the evaluation mask's points)."""
    from motion_data.common.static_filter import METRICS
    from motion_data.build.stats import keep_mask

    flt = build.build_filter
    _, vis, st = read_clips(build, [row])
    vc = step_valid(vis).sum(axis=1).astype(np.uint8)
    return keep_mask(st[:, METRICS.index(flt.metric)], vc, flt.threshold, flt.min_keep)[0]


def moving_accuracy(build: BuildDir, m: dict, keep: np.ndarray) -> float:
    """Non-centre accuracy of ``clip_motion``'s prediction over the steps of the ``keep`` points
    whose label is not the centre class (nan when there are none)."""
    ok = m["valid"][:, keep]
    moving = ok & (m["labels"][:, keep] != (build.W // 2) * (build.W + 1))
    return float((m["pred"][:, keep] == m["labels"][:, keep])[moving].mean()) if moving.any() else float("nan")


def draw_compare(data, runs: dict, out, clip_id=None, picture: Picture = Picture(size=384),
                 checkpoint: CheckpointChoice = CheckpointChoice(), val_split=None) -> tuple[Path, str]:
    """One PNG, one panel per run side by side: for the clip's moving points (the evaluation
    mask's), the true motion (green: start plus the label displacements) and the motion the
    run decodes from the clip's codes (red, dashed), over ``picture.frame``. Collapse shows as red paths
    that stay on their start points."""
    from tokenizer_train.use.api import load_tokenizer

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DataError(f"{out}: a comparison is a .png")
    build = BuildDir(data)
    toks = {name: load_tokenizer(r, checkpoint.which, checkpoint.device) for name, r in runs.items()}
    first = next(iter(toks.values()))
    row = pick_clip(build, clip_id, first.config.data.val_split if val_split is None else val_split)
    cid = build.manifest(["clip_id"])["clip_id"][row]
    img = _read_frame(picture.frame) if isinstance(picture.frame, (str, Path)) else picture.frame
    keep = moving_points(build, row)
    from matplotlib.lines import Line2D

    n = len(toks)
    fig, axes, plt = _figure(picture.size, panels=n)
    axes = axes if n > 1 else [axes]
    moved = False
    try:
        for i, ((name, tok), ax) in enumerate(zip(toks.items(), axes)):
            m = clip_motion(build, row, tok)
            moved |= bool(np.abs(m["pred_disp"][:, keep]).any())
            _background(ax, img, build.ref_size)
            lab = _paths(m["pos"][0], m["label_disp"])[:, keep]
            pred = _paths(m["pos"][0], m["pred_disp"])[:, keep]
            ax.plot(lab[..., 0], lab[..., 1], color="tab:green", lw=1.2, alpha=0.9)
            ax.plot(pred[..., 0], pred[..., 1], color="tab:red", lw=1.2, ls="--", alpha=0.9)
            ax.scatter(m["pos"][0, keep, 0], m["pos"][0, keep, 1], s=5, color="black", zorder=3)
            acc = moving_accuracy(build, m, keep)
            fig.text((i + 0.5) / n, 1.0 - 3 / fig.bbox.height, f"{name}: non-centre accuracy {acc:.2f}",
                     ha="center", va="top", fontsize=8)
        items = [(Line2D([], [], ls="", marker="o", ms=3, color="black"), f"start of the {int(keep.sum())} moving points"),
                 (Line2D([], [], color="tab:green"), "true motion"),
                 (Line2D([], [], color="tab:red", ls="--"), "decoded from the codes") if moved else
                 (Line2D([], [], ls=""), "decoded from the codes: no motion anywhere")]
        fig.legend(*zip(*items), loc="upper center", bbox_to_anchor=(0.5, 1.0 - 18 / fig.bbox.height), ncol=3,
                   fontsize=7, frameon=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out, cid


def draw_clip(data, out, clip_id=None, run=None, picture: Picture = Picture(), checkpoint: CheckpointChoice = CheckpointChoice(),
              val_split=None, progress=True) -> tuple[Path, str]:
    """Draw one clip to ``out`` (.png or .gif); returns (out, the clip id drawn)."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".png", ".gif"):
        raise DataError(f"{out}: the output must end in .png (whole clip) or .gif (one frame per step)")
    if picture.size < 64:
        raise SettingError(f"--size must be >= 64 px, got {picture.size}")
    if picture.fps <= 0:
        raise SettingError(f"--fps must be > 0, got {picture.fps}")
    build = BuildDir(data)
    tok = None
    if run is not None:
        from tokenizer_train.use.api import load_tokenizer

        tok = load_tokenizer(run, checkpoint.which, checkpoint.device)
        build.check_compatible(W=tok.W, N=tok.N, what=f"the run {run}")
    if val_split is None:
        val_split = DEFAULT_VAL_SPLIT if tok is None else tok.config.data.val_split
    row = pick_clip(build, clip_id, val_split)
    cid = build.manifest(["clip_id"])["clip_id"][row]
    img = _read_frame(picture.frame) if picture.frame is not None else None
    m = clip_motion(build, row, tok)
    title = cid
    if "pred" in m:
        ok = m["valid"]
        title += f"  (acc {float((m['pred'] == m['labels'])[ok].mean()) if ok.any() else 0.0:.2f})"
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == ".png":
        draw_png(m, out, build.ref_size, title, img, picture.size)
    else:
        draw_gif(m, out, build.ref_size, title, img, picture.size, picture.fps, progress)
    return out, cid


def run(args) -> int:
    if args.compare:
        runs = dict(x.split("=", 1) if "=" in x else (Path(x).name, x) for x in args.compare)
        out, cid = draw_compare(args.data, runs, args.out, args.clip, Picture(args.frame, min(args.size, 512)),
                                CheckpointChoice(args.checkpoint, args.device), args.val_split)
        print(f"wrote {out} (clip {cid})", file=sys.stderr)
        return 0
    out, cid = draw_clip(args.data, args.out, args.clip, args.run, Picture(args.frame, args.size, args.fps),
                         CheckpointChoice(args.checkpoint, args.device), args.val_split)
    print(f"wrote {out} (clip {cid})", file=sys.stderr)
    return 0
