"""How many DataLoader worker processes: ``data.num_workers: auto`` (the default).

On a CPU device the model's own ops already use every core, and loading in the training
process spends the fewest CPU seconds per clip (``benchmarks/bench_loader.py``: workers
add a hand-off per batch), so ``auto`` is 0 there. On a CUDA device the GPU waits for the
loader, so ``auto`` gives each rank the cores of its share of the node but one (kept for
the rank's own process), at most ``MAX_AUTO``.
"""
from __future__ import annotations

import os

AUTO = "auto"
MAX_AUTO = 8  # beyond this a rank's workers mostly add start-up time and shared memory


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(device_type: str, cores: int | None = None, ranks_per_node: int | None = None) -> int:
    """Workers per rank for ``device_type`` (``cpu``/``cuda``) on ``cores`` usable cores
    shared by ``ranks_per_node`` ranks (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    if device_type != "cuda":
        return 0
    cores = usable_cores() if cores is None else int(cores)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if ranks_per_node is None else int(ranks_per_node)
    return max(0, min(MAX_AUTO, cores // max(1, ranks) - 1))


def resolve_workers(value, device_type: str) -> int:
    """``data.num_workers`` (an integer >= 0 or ``"auto"``) as a number of workers."""
    if value == AUTO:
        return auto_workers(device_type)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.num_workers must be an integer >= 0 or 'auto', got {value!r}")
    return value


def loader_worker_init(main_pid: int, worker_id: int):
    """A loader worker dies with the trainer (exit_with_parent) but ignores Ctrl-C and SIGTERM:
    those reach the workers too, and the trainer finishes its step and saves first
    (tokenizer_train.common.stop), then ends them itself; a worker that died would fail it."""
    import signal

    from motion_data.common.parent_death import exit_with_parent

    exit_with_parent(main_pid, worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_worker_context(preload: str):
    """Workers come from a forkserver that has imported ``preload`` (the loader's module):
    forking the trainer itself is unsafe once numba's OpenMP threads have run in it (the stats
    kernels do), and spawning re-imports torch for every worker of every epoch."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])
    return ctx
