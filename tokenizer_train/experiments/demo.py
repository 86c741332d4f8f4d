"""End-to-end demo: LIBERO tracks, filter tuning, three trainings, acceptance check, a picture.

  python -m tokenizer_train demo [--out demo_out] [--data auto|libero-sample|synthetic|vtest|DIR]
                                 [--epochs N] [--quick] [--no-video] [--no-libero]

On a fresh machine, in one folder (default demo_out/):
  1. data/libero_sample/  the LIBERO sample shipped with the package (36 rollouts of
                          libero_90, libero_object and libero_spatial with ground-truth tracks
                          and their start frames, made by render-libero), the default;
                          --data synthetic|vtest|DIR for synthetic tracks, the street video
                          vtest.avi tracked with OpenCV (Debian package opencv-doc), or a
                          folder of track files
  2. build/               build-shards of it, split by whole rollouts
  3. tune-filter          threshold sweep and its recommendation (printed, for reference)
  4. ablation/            three runs on the same data, split, seed and budget (model size and
                          epochs of FULL below, smaller than the configs' own): configs/base.yaml
                          as it is (no filter: the collapsing baseline), base.yaml with the
                          recommended filter (the fair baseline) and configs/recommended.yaml;
                          results.md (code information first), plots; all scored on the
                          evaluation mask (valid AND the build's recorded filter)
  5. check                the acceptance gates of recommended against both baselines (printed;
                          also ablation/check.json); gates the runs are too short for are
                          reported as not reached, never as passed
  6. frontier             recommended's validation accuracy / non-centre accuracy as the
                          centre logit is shifted, and its code information, CE, AUC and EPE
                          next to zero motion's (printed; also ablation/frontier.json)
  then ablation/compare.png: the true and the decoded motion of a held-out clip's moving
  points over its start frame, base.yaml and recommended side by side.
TensorBoard logs are in OUT/ablation/runs: tensorboard --logdir OUT/ablation/runs
Rerunning resumes (also after Ctrl-C): finished steps are kept. A failing gate is reported in the table, not
as an error; the exit code is non-zero only when a step fails.
(CE: cross-entropy of the labels under the decoder, bits per label; AUC: area under the ROC
curve of moving vs static points scored by 1 - p(centre); EPE: end-point error of the
predicted displacement, px)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from motion_data.common.atomic import atomic_write_json
from motion_data.common.errors import UserError

from tokenizer_train.experiments import ablate as AB
from tokenizer_train.experiments import variants as V
from tokenizer_train.evaluate import check as C
from tokenizer_train.evaluate import frontier as F


@dataclass
class DemoSize:
    synth_clips: int
    grid: int
    video_stride: int
    epochs: int
    libero_tasks: int  # LIBERO rollouts: tasks 0..n-1 of libero_90 and of libero_object, one episode each
    model: dict  # config overrides (dotted key -> value) of the model and optimisation, common to both runs


FULL = DemoSize(synth_clips=200, grid=20, video_stride=8, epochs=6, libero_tasks=3,
                model={"model.hidden_dim": 64, "model.num_layers": 1, "model.num_heads": 4, "training.batch_size": 16,
                       "training.learning_rate": 1e-3, "training.log_interval": 4})
QUICK = DemoSize(synth_clips=48, grid=6, video_stride=8, epochs=2, libero_tasks=1,
                 model={"model.hidden_dim": 16, "model.num_layers": 1, "model.num_heads": 2, "training.batch_size": 8,
                        "training.learning_rate": 1e-3, "training.log_interval": 1, "data.val_split": 0.25})


def _step(msg: str):
    print(f"\n== {msg}", flush=True)


def libero_data(out: Path, size: DemoSize, progress: bool) -> list[str] | None:
    """Rendered LIBERO rollouts (resumable) when the simulator extra is installed, else None."""
    from tqdm import tqdm

    from motion_data.common.errors import SettingError
    from motion_data.sources.libero.render import RenderConfig, require_sim
    from motion_data.sources.libero.jobs import claim_folder, pending, run_jobs

    try:
        require_sim()
    except SettingError as e:
        print(f"LIBERO: not used ({e})")
        return None
    folder = out / "data" / "libero"
    tasks = list(range(size.libero_tasks))
    claim_folder(folder, RenderConfig())  # a folder rendered with other settings is refused, never mixed
    jobs = [j for suite in ("libero_90", "libero_object") for j in pending(folder, suite, tasks, 1)]
    n = sum(len(eps) for _, _, eps in jobs)
    with tqdm(total=n, desc="render-libero", unit="rollout", disable=not progress) as bar:
        run_jobs(jobs, RenderConfig(), folder, workers=2, on_done=lambda s: bar.update(1))
    print(f"LIBERO: {2 * size.libero_tasks} rollouts (libero_90 and libero_object, tasks 0-{size.libero_tasks - 1}) "
          f"with ground-truth tracks -> {folder}")
    return [str(folder)]


DATA_CHOICES = ("auto", "libero-sample", "synthetic", "vtest")


def sample_data(out: Path) -> list[str]:
    """The LIBERO sample shipped with the package, unpacked to track files and frames (once)."""
    from motion_data.sources.libero import sample as LS

    folder = out / "data" / "libero_sample"
    done = folder / "done.json"
    if not done.exists():
        files = LS.unpack(folder)
        done.write_text(json.dumps({"rollouts": len(files)}))
    info = json.loads(LS.SAMPLE_INFO.read_text()) if LS.SAMPLE_INFO.exists() else {}
    print(f"LIBERO sample: {json.loads(done.read_text())['rollouts']} rollouts with ground-truth tracks "
          f"(made by: {info.get('command', 'render-libero')}) -> {folder}")
    return [str(folder)]


def make_data(out: Path, size: DemoSize, video: bool, progress: bool, libero: bool = True,
              data: str = "auto") -> list[str]:
    """The demo's input folders. ``data``: ``libero-sample`` (the package's LIBERO sample),
    ``synthetic`` (plus vtest.avi tracks when ``video`` and installed), ``vtest`` (the same),
    a folder of track files, or ``auto``: the LIBERO sample when the package ships it, else
    rendered LIBERO rollouts when ``libero`` and the simulator is installed, else synthetic."""
    from tqdm import tqdm

    from motion_data.sources.libero import sample as LS
    from motion_data.sources.synth import SynthConfig, write_synth
    from motion_data.sources.video import TrackConfig, find_sample_video, track_video, write_track_file

    if data not in DATA_CHOICES:
        if not Path(data).is_dir():
            raise UserError(f"--data {data}: neither one of {', '.join(DATA_CHOICES)} nor a folder of track files")
        print(f"track files: {data}")
        return [str(data)]
    if data == "libero-sample" or (data == "auto" and libero and LS.SAMPLE.exists()):
        return sample_data(out)
    video = video and data != "synthetic"
    if data == "auto" and libero:
        folders = libero_data(out, size, progress)
        if folders:
            return folders
    synth = out / "data" / "synth"
    done = synth / "done.json"
    if not done.exists():
        with tqdm(total=size.synth_clips, desc="synth", unit="clip", disable=not progress) as bar:
            write_synth(synth, size.synth_clips, seed=0, cfg=SynthConfig(grid=size.grid), progress=bar.update)
        done.write_text(json.dumps({"clips": size.synth_clips, "grid": size.grid}))
    print(f"synthetic: {size.synth_clips} clips of {size.grid}x{size.grid} points -> {synth}")
    inputs = [str(synth)]
    if not video:
        print("vtest.avi: skipped (--no-video)")
        return inputs
    path = find_sample_video()
    if path is None:
        print("vtest.avi: not installed (Debian: apt-get install opencv-doc); synthetic data only")
        return inputs
    tracks = out / "data" / "tracks" / "vtest.npz"
    if not tracks.exists():
        d = track_video(path, TrackConfig(stride=size.video_stride, grid=size.grid), progress=progress)
        write_track_file(tracks, d)
    import numpy as np

    with np.load(tracks, allow_pickle=False) as z:
        n = z["tracks"].shape[0]
    print(f"vtest.avi: {n} windows (stride {size.video_stride}) of {size.grid}x{size.grid} points -> {tracks}")
    inputs.append(str(tracks.parent))
    return inputs


def tune(build_dir: Path) -> str:
    """Sweep p95 thresholds from the build's histograms with tune-filter's default targets,
    print tune-filter's table; return its recommendation as ``metric@threshold`` (shown for
    reference: the runs use their configs' filters)."""
    from motion_data.inspect import analysis as A
    from motion_data.build.folder import BuildDir
    from motion_data.common.static_filter import DEFAULT_FILTER
    from motion_data.inspect.tables import print_sweep

    b = BuildDir(build_dir)
    targets = A.Targets(A.DEFAULT_TARGET_DYNAMIC, A.DEFAULT_MAX_CENTER, A.DEFAULT_MIN_PERPLEXITY)
    rows = A.sweep_from_hist(b.histograms(["p95"]), ["p95"], A.threshold_range(0.02, 0.10, 0.01), DEFAULT_FILTER.min_keep, b.W, targets)
    rec, why = A.recommend(rows, targets)
    print(f"{build_dir}: {b.n_clips} clips, from histograms; targets: {targets}")
    print_sweep(rows, rec, why)
    return f"{rows[rec].metric}@{rows[rec].threshold:g}"


def demo(out, epochs: int | None = None, quick: bool = False, video: bool = True, progress: bool = True,
         libero: bool = True, data: str = "auto") -> dict:
    """Run every step; return {"gates": [...], "passed": bool, "table": [...], "wall_s": float}."""
    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options

    t0 = time.perf_counter()
    out = Path(out)
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)

    _step("1/6 data")
    inputs = make_data(out, size, video, progress, libero, data)

    _step("2/6 build-shards")
    build_dir = out / "build"
    summary = build(inputs, build_dir, Options(maxcount=200), progress=progress,
                    command=["tokenizer_train", "demo", str(out)])
    print(f"{build_dir}: {summary['clips']} clips")

    _step("3/6 tune-filter")
    flt = tune(build_dir)
    print(f"tune-filter recommends {flt}; configs/recommended.yaml trains with its own filter, the baseline "
          f"with none; both are scored on the evaluation mask (the build's filter)")

    _step("4/6 train baseline (configs/base.yaml as it is), the filtered baseline (base.yaml with the "
          "recommended filter) and recommended (configs/recommended.yaml)")
    every = V.load_variants(V.DEFAULT_VARIANTS)
    variants = {V.FILTERED: every[V.FILTERED], "recommended": every["recommended"]}
    abl = out / "ablation"
    grid = AB.RunGrid(V.CONFIG_DIR / "base.yaml", variants, seeds=(0,), sets=size.model, epochs=epochs or size.epochs)
    table = AB.ablate(grid, build_dir, abl, progress=progress)
    print()
    print((abl / "results.md").read_text())

    _step("5/6 check: recommended vs the baseline and the filtered baseline")
    rows = C.read_metrics(abl / "runs" / "recommended" / "seed0")
    base = C.read_metrics(abl / "runs" / V.BASELINE / "seed0")
    fb = C.read_metrics(abl / "runs" / V.FILTERED / "seed0")
    print(C.baseline_table({"recommended": rows, "baseline": base, "filtered baseline": fb}) + "\n")
    gates = C.evaluate(rows, base, fb)
    ok = C.report(gates, abl / "check.json")  # the verdict line leads with code information

    _step("6/6 frontier: is the accuracy / motion trade-off the decision rule or the model?")
    fr = F.cached_frontier(abl / "runs" / "recommended" / "seed0", build_dir)  # computed by ablate above
    print(F.format_result(fr))
    atomic_write_json(abl / "frontier.json", fr)
    picture = compare_picture(build_dir, abl, inputs)
    wall = time.perf_counter() - t0
    print(f"\nthe baseline's and recommended's decoded motion of a typical held-out clip's moving points: {picture}")
    print(f"demo finished in {wall:.0f} s. Results: {abl}/results.md, plots {abl}/*.png")
    print(f"TensorBoard: tensorboard --logdir {abl / 'runs'}")
    return {"gates": gates, "passed": ok, "table": table, "wall_s": wall}


def compare_picture(build_dir: Path, abl: Path, inputs: list[str]) -> Path:
    """draw --compare of the baseline and recommended on a typical held-out clip: among the
    validation clips whose start frame the data has (the LIBERO sample's
    frames/<rollout>_f<start>.png; all validation clips when none has one), the one whose
    non-centre accuracy under recommended is closest to the run's whole validation figure."""
    from motion_data.build.folder import BuildDir
    from motion_data.read.split import split_manifest

    from tokenizer_train.evaluate.check import read_metrics, series
    from tokenizer_train.use.api import load_tokenizer
    from tokenizer_train.use.draw import CheckpointChoice, Picture, clip_motion, draw_compare, moving_accuracy, moving_points

    runs = {"base.yaml": abl / "runs" / V.BASELINE / "seed0", "recommended": abl / "runs" / "recommended" / "seed0"}
    b = BuildDir(build_dir)
    man = b.manifest(["clip_id", "source", "split_group", "start_frame"])
    _, val = split_manifest(man, _val_split(runs["recommended"]), b.T)
    frames = {}
    for r in val:  # held-out clips whose start frame was kept
        stem = Path(man["source"][r]).stem
        f = [Path(d) / "frames" / f"{stem}_f{int(man['start_frame'][r]):04d}.png" for d in inputs]
        f = next((x for x in f if x.exists()), None)
        if f is not None:
            frames[int(r)] = f
    pool = list(frames) or [int(r) for r in val][:64]
    best = None
    if pool:
        whole = series(read_metrics(runs["recommended"]), "val/acc_noncenter_epoch")
        target = whole[-1][2] if whole else 0.0
        tok = load_tokenizer(runs["recommended"], "last", "cpu")  # the checkpoint of the figures printed
        acc = {}
        for r in pool:
            keep = moving_points(b, r)
            if keep.any():
                acc[r] = moving_accuracy(b, clip_motion(b, r, tok), keep)
        scored = [r for r in acc if acc[r] == acc[r]]  # not nan
        best = min(scored, key=lambda r: abs(acc[r] - target)) if scored else pool[0]
    clip = man["clip_id"][best] if best is not None else None
    out, _ = draw_compare(build_dir, runs, abl / "compare.png", clip, Picture(frames.get(best), size=320),
                          CheckpointChoice("last", "cpu"))
    return out


def _val_split(run_dir: Path) -> float:
    from tokenizer_train.common.config import load_config

    return load_config(run_dir / "config.yaml").data.val_split


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--data", default="auto",
                   help="the demo's tracks: libero-sample (the LIBERO rollouts shipped with the package), synthetic, "
                        "vtest (synthetic plus vtest.avi tracked, when installed), or a folder of track files; auto "
                        "(default): the LIBERO sample when the package ships it, else LIBERO rendered with the "
                        "simulator extra when installed, else synthetic (plus vtest)")
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s); rerun to resume")
    p.add_argument("--epochs", type=int, help=f"training epochs of each run (default: {FULL.epochs}; "
                                              f"--quick: {QUICK.epochs})")
    p.add_argument("--quick", action="store_true", help="tiny data and model (a smoke test of every step)")
    p.add_argument("--no-video", action="store_true", help="synthetic data only, even when vtest.avi is installed")
    p.add_argument("--no-libero", action="store_true",
                   help="synthetic data (and vtest.avi) even when the LIBERO simulator extra is installed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        print("error: --epochs must be >= 1", file=sys.stderr)
        return 2
    try:
        demo(args.out, args.epochs, args.quick, video=not args.no_video, progress=not args.no_progress,
             libero=not args.no_libero, data=args.data)
    except UserError:
        raise  # the user's to fix: the dispatcher's one line (exit 2)
    except Exception as e:  # noqa: BLE001 -- any failed step: one line, non-zero exit
        print(f"demo: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; training saved a checkpoint first (tokenizer_train.common.stop)
        print(f"python -m tokenizer_train demo: interrupted; run the same command again to resume "
              f"(finished steps are kept, training continues from its last checkpoint in {args.out})",
              file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    return 0
