"""``build-shards --executor ray``: the plan, task and finalize steps of ``plan`` on a Ray cluster.

Ray tasks, not Ray Data's writers (those name files by uuid and do not keep order): the
inputs are counted by one task each, the shards written by ``n`` tasks over contiguous
shard ranges, spread over the nodes round-robin (node affinity, soft: a lost node's tasks
run elsewhere), and finalized on the driver. A task whose worker dies is retried; shards are
written atomically and a valid record is never rewritten, so a retry, or a re-run of the
whole command after the driver died, ends in the same bytes. Every node must see the input
and output folders (a shared file system).
"""
from __future__ import annotations

import sys
import time

from motion_data.build import plan as P
from motion_data.build.setup import Options
from motion_data.common.errors import DataError, SettingError, UserError

TASK_RETRIES = 5  # tries of a task whose worker process or node died


def _ray():
    try:
        import ray
    except ImportError:
        raise SettingError("--executor ray needs Ray: pip install -e '.[ray]'") from None
    return ray


def _unwrap(e):
    """A user error raised inside a task, as itself (one line), else the Ray error."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, UserError) else e


def _on_node(fn, out: str, i: int, n: int) -> dict:
    """What a Ray task runs: ``fn(out, i, n)`` and the node it ran on."""
    import ray

    return {**fn(out, i, n), "node": ray.get_runtime_context().get_node_id()}


def _cpu_nodes(ray) -> list:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def ray_build(inputs, out, opts: Options, *, address=None, overwrite=False, progress=True, command=None,
              task_fn=None) -> dict:
    """Plan (one Ray task per input), execute (Ray tasks over shard ranges), finalize; the
    summary. ``address``: a running cluster (``auto`` or HOST:PORT); None starts a local Ray.
    ``task_fn``: what a task runs (``plan.run_task``; tests wrap it)."""
    t0 = time.perf_counter()
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm import tqdm

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SettingError(f"--ray-address {address or '(local)'}: cannot start or reach Ray "
                               f"({type(e).__name__}: {e})") from None
    try:
        count = ray.remote(max_retries=TASK_RETRIES)(P.count_input)
        try:
            plan = P.make_plan(inputs, out, opts, overwrite=overwrite,
                               counter=lambda tasks: ray.get([count.remote(t) for t in tasks]), command=command)
            if "done" in plan:
                return {**plan["done"], "status": "up-to-date"}
            nodes = _cpu_nodes(ray)
            n = max(1, min(len(plan["shards"]), 2 * int(ray.cluster_resources().get("CPU", 1))))
            fn = ray.remote(max_retries=TASK_RETRIES)(_on_node)
            pending = [fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True))
                       .remote(task_fn or P.run_task, str(out), i, n) for i in range(n)]
            ran = []
            with tqdm(total=n, unit="task", desc="build-shards (ray)", disable=not progress, file=sys.stderr) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ran += ray.get(done)
                    bar.update(len(done))
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        except ray.exceptions.RayError as e:  # a worker or node lost more often than the retries allow
            raise DataError(f"{out}: the Ray build stopped ({type(e).__name__}: {e}); re-run the same command to "
                            f"resume from the shards already written") from None
        summary = P.finalize_plan(out, command, t0)
        return {**summary, "ray_tasks": n, "ray_nodes": len({r["node"] for r in ran})}
    finally:
        if started:
            ray.shutdown()
