"""What the reliability, run-folder, DDP and multiprocess tests share: a small build, the
``--set`` arguments, a CLI wrapper that holds training at a chosen step, and the wait for a
subprocess to reach its marker."""
from __future__ import annotations

import time

import pytest

from loader_fixtures import write_build

SOURCES = ["v/a.h5", "v/b.h5", "v/c.h5"]


def small_build(path, shard_sizes=(6, 6, 6)):
    """18 clips in three shards of three sources (whole-source split groups)."""
    return write_build(path, shard_sizes=shard_sizes, sources=SOURCES)


def set_args(sets) -> list[str]:
    return sum((["--set", s] for s in sets), [])


# the CLI, holding training after optimizer step E_AT (on rank E_RANK; any rank when unset)
# until a stop signal arrived; on getting there it writes its pid to E_MARKER (atomically)
HOLD_AT_STEP = """
import os, sys, time
import tokenizer_train.train.trainer as T
marker, at, rank = os.environ["E_MARKER"], int(os.environ["E_AT"]), int(os.environ.get("E_RANK", -1))
real_step = T.Trainer.optimizer_step
def optimizer_step(self):
    out = real_step(self)
    self.steps_here = getattr(self, "steps_here", 0) + 1
    if self.steps_here == at and rank in (-1, self.dist.rank):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        t0 = time.time()
        while not self.stop.signum and time.time() - t0 < 120:
            time.sleep(0.01)
    return out
T.Trainer.optimizer_step = optimizer_step
from tokenizer_train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def wait_for(marker, p, what: str, timeout: float = 120):
    """Wait until ``marker`` exists; fail with the process's stderr if it ends first."""
    deadline = time.time() + timeout
    while not marker.exists():
        if p.poll() is not None:
            err = p.stderr.read()
            err = err.decode() if isinstance(err, bytes) else err
            pytest.fail(f"the process ended before {what}: {err[-3000:]}")
        assert time.time() < deadline, f"the process never reached {what}"
        time.sleep(0.02)


TINY = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=4",
        "training.epochs=1", "data.val_split=0.25", "training.device=cpu"]


def train_one_thread(sets, build, out):
    """``train`` in this process with one torch thread (tiny ops; sums independent of the cores)."""
    import torch

    from tokenizer_train.common.config import from_dict
    from tokenizer_train.train.trainer import train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(from_dict({}, list(sets)), build, out)
    finally:
        torch.set_num_threads(n)
    return out
