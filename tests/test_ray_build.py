"""build-shards --executor ray on a two-node Ray test cluster (1 CPU each, both nodes on this
machine, one shared output folder): the same bytes as the one-process build, with a task's
worker killed mid-task and with the driver killed and the command run again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from conftest import TINY_MAXCOUNT  # noqa: E402
from test_array_build import assert_same_build  # noqa: E402

from motion_data.build.build_shards import build  # noqa: E402
from motion_data.build.ray_exec import ray_build  # noqa: E402
from motion_data.build.setup import Options  # noqa: E402

MAXCOUNT = 6  # 10 shards of the tiny tracks: several tasks per node


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local6(tiny_tracks, tmp_path_factory):
    out = tmp_path_factory.mktemp("local6") / "build"
    build([str(tiny_tracks)], out, Options(maxcount=MAXCOUNT), progress=False)
    return out


def test_two_nodes_build_the_bytes_of_one_process(cluster, tiny_tracks, local6, tmp_path):
    s = ray_build([str(tiny_tracks)], tmp_path / "b", Options(maxcount=MAXCOUNT), progress=False)
    assert s["shards"] == 10 and s["ray_nodes"] == 2  # both nodes wrote shards
    assert_same_build(tmp_path / "b", local6)


def _dies_once(out, i, n):
    """A task that SIGKILLs its own worker right after writing its first shard, once (a
    marker file in the build folder says whether it already did)."""
    import os
    import signal
    from pathlib import Path

    from motion_data.build import plan as P

    marker = Path(out) / "kill-once"
    real = P.write_shard_and_record

    def write_then_die(*a):
        c = real(*a)
        if i == 1 and marker.exists():
            marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return c

    P.write_shard_and_record = write_then_die
    try:
        return P.run_task(out, i, n)
    finally:
        P.write_shard_and_record = real


def test_a_worker_killed_mid_task_is_retried_to_the_same_bytes(cluster, tiny_tracks, local6, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from motion_data.build import plan as P

    out = tmp_path / "b"
    P.make_plan([str(tiny_tracks)], out, Options(maxcount=MAXCOUNT))  # planned first: a new --out must be empty
    (out / "kill-once").touch()
    s = ray_build([str(tiny_tracks)], out, Options(maxcount=MAXCOUNT), progress=False, task_fn=_dies_once)
    assert not (out / "kill-once").exists()  # the worker did die
    assert s["shards"] == 10
    assert_same_build(out, local6)


def test_the_driver_killed_then_run_again_ends_in_the_same_bytes(cluster, tiny_tracks, local6, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "--input", str(tiny_tracks), "--out", str(out),
           "--maxcount", str(MAXCOUNT), "--executor", "ray", "--ray-address", cluster.address, "--no-progress"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / ".work").glob("rec-*.npz")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_before_the_end = not (out / "build.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert killed_before_the_end  # the first driver died mid-build
    assert_same_build(out, local6)


def confined(leak_dir=None):
    """A task: ``run_task``, refusing any file it opens outside the shared folder (the build's
    parent's parent, which holds the inputs too) other than code and the interpreter's own
    files. ``leak_dir``: the control, task 0 first opens a file there."""

    def task(out, i, n):
        import os
        import sys
        from pathlib import Path

        from motion_data.build import plan as P

        shared = str(Path(out).resolve().parent.parent)
        code = tuple({sys.prefix, sys.base_prefix, str(Path(P.__file__).resolve().parents[2]), "/proc", "/dev",
                      "/sys", "/etc", "/usr"})
        seen = []

        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                seen.append(os.path.abspath(os.fsdecode(args[0])))

        sys.addaudithook(hook)  # (stays for the worker's life; only this task's list is checked)
        if leak_dir and i == 0:
            open(os.path.join(leak_dir, f"leak-{os.getpid()}"), "w").close()
        r = P.run_task(out, i, n)
        outside = [p for p in seen if not p.startswith(shared) and not p.startswith(code)]
        if outside:
            raise RuntimeError(f"task {i}/{n} opened files outside {shared}: {sorted(set(outside))[:5]}")
        return r

    return task


def test_tasks_open_nothing_outside_the_shared_folder(cluster, tiny_tracks, local6, tmp_path_factory):
    """Inputs and the build in one shared folder: every file a task opens is under it (and a
    task that opens one elsewhere fails the build: the check can fail)."""
    import shutil

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shared = tmp_path_factory.mktemp("shared")
    shutil.copytree(tiny_tracks, shared / "tracks")
    out = shared / "builds" / "b"
    s = ray_build([str(shared / "tracks")], out, Options(maxcount=MAXCOUNT), progress=False, task_fn=confined())
    assert s["shards"] == 10
    assert_same_build(out, local6)
    leak = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(Exception, match="opened files outside"):
        ray_build([str(shared / "tracks")], shared / "builds" / "c", Options(maxcount=MAXCOUNT), progress=False,
                  task_fn=confined(str(leak)))


from test_remote import weed  # noqa: E402,F401 (the S3 test server fixture)


def test_ray_build_from_s3_to_s3_through_a_shared_stage(cluster, weed, tiny_tracks, local6, tmp_path):
    """Inputs and the build in S3 (seaweedfs): the inputs are staged in a folder every node
    sees, built there by the cluster, then published; the objects equal the local build."""
    from motion_data.build.folder import BuildDir
    from preprocess.__main__ import main as pre

    weed.fs.put(str(tiny_tracks), "bucket/rtracks", recursive=True)
    argv = ["build-shards", "--input", "s3://bucket/rtracks", "--out", "s3://bucket/rb", "--stage",
            str(tmp_path / "shared"), "--maxcount", str(MAXCOUNT), "--executor", "ray", "--ray-address",
            cluster.address, "--no-progress"]
    assert pre(argv) == 0
    local = BuildDir(local6)
    shards = sorted(set(local.manifest(["shard"])["shard"]))
    assert len(shards) == 10
    for s in shards:
        assert weed.fs.cat(f"bucket/rb/{s}") == (local6 / s).read_bytes(), s
    remote = BuildDir("s3://bucket/rb")
    assert remote.manifest() == local.manifest()
    for name in ("p95", "valid_count"):
        np.testing.assert_array_equal(remote.per_clip(name), local.per_clip(name))
    assert pre(argv) == 0  # again: the published build is this one, nothing is uploaded
    no_stage = argv[:5] + argv[7:]
    assert "--stage" not in no_stage and pre(no_stage) == 2  # --executor ray without a shared --stage: refused
