"""motion-tokenizer (or python -m tokenizer_train) COMMAND ...: train, tokenize, ablate, check, frontier, demo, decode, draw."""
import os
import sys

# Before torch allocates anything: large CPU tensors (the (B, S, N, W*W) logits and their
# gradients) on transparent huge pages. Without it every step maps and faults in those pages
# anew, which costs a large share of system time in training (docs/results.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from motion_data.common.cli import dispatch  # noqa: E402

COMMANDS = {
    "train": ("tokenizer_train.train.command", "train a motion tokenizer (also under torchrun)"),
    "tokenize": ("tokenizer_train.use.export_codes", "write each clip's code ids to Parquet"),
    "ablate": ("tokenizer_train.experiments.ablate", "train the baseline and each mitigation; results table"),
    "check": ("tokenizer_train.evaluate.check", "evaluate the original plan's acceptance gates (and this project's) on a run"),
    "frontier": ("tokenizer_train.evaluate.frontier", "accuracy vs non-centre accuracy as the centre logit is shifted"),
    "demo": ("tokenizer_train.experiments.demo", "end-to-end demo: data, filter tuning, baseline vs recommended"),
    "decode": ("tokenizer_train.use.decode", "code ids back to predicted per-point displacements (npz)"),
    "draw": ("tokenizer_train.use.draw", "picture of a clip: tracks, labels and predicted motion (PNG or GIF)"),
}


def main(argv=None) -> int:
    return dispatch("python -m tokenizer_train", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
