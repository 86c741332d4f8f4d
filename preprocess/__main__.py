"""motion-preprocess (or python -m preprocess) COMMAND ...: point tracks in; per-point statistics
(Zarr), webdataset shards and a manifest out. Add --help after a command for its options."""
import sys

from motion_data.common.cli import dispatch

COMMANDS = {
    "synth": ("preprocess.synth_cmd", "write synthetic track files (static background, movers, an arm)"),
    "track-video": ("preprocess.track_video_cmd", "track a point grid through videos with pyramidal Lucas-Kanade"),
    "build-shards": ("preprocess.build_cmd", "tracks -> stats.zarr + webdataset shards + manifest.parquet"),
    "merge": ("preprocess.merge_cmd", "join the outputs of several --part i/n builds"),
    "analyze": ("preprocess.analyze_cmd", "label statistics before/after the static filter (+ plot)"),
    "tune-filter": ("preprocess.tune_cmd", "sweep static-filter thresholds from the stored histograms"),
    "render-libero": ("preprocess.render_libero_cmd", "scripted LIBERO rollouts -> ground-truth track files (extra [sim])"),
}


def main(argv=None) -> int:
    return dispatch("python -m preprocess", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
