"""Worker processes die with the process that started them (SIGKILL of the main process)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import make_track_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children of all its threads, recursively)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def running(pid: int) -> bool:
    """Exists and is not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_expect_orphans_gone(p: subprocess.Popen, workers: set[int], within: float = 4.0) -> None:
    assert workers, "no worker processes found before the kill"
    p.send_signal(signal.SIGKILL)  # the main process only, as the OOM killer does
    p.wait()
    deadline = time.time() + within
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = sorted(w for w in workers if running(w))
    for w in left:  # do not leave them behind for the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent by {within} s"


def wait_for(cond, p: subprocess.Popen, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_build_workers_die_with_a_killed_build(tmp_path):
    inp = tmp_path / "in"
    first = make_track_file(inp / "v000.npz", B=8, T=200, grid=20, seed=1)
    for i in range(1, 40):  # same content, many files: the pool stays busy for a while
        shutil.copy(first, inp / f"v{i:03d}.npz")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "preprocess", "build-shards", "--input", str(inp), "--out", str(out),
                          "--workers", "2", "--maxcount", "50", "--no-progress"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # busy: both workers started and the first shard written, far from the last one
        wait_for(lambda: len(descendants(p.pid)) >= 2 and any((out / "shards").glob("*.tar")), p,
                 what="the build got going")
        workers = descendants(p.pid)
        assert p.poll() is None, "build finished before the kill; make the input bigger"
        kill_and_expect_orphans_gone(p, workers)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_loader_workers_die_with_a_killed_trainer(tmp_path):
    pytest.importorskip("torch")
    from loader_fixtures import write_build

    root = write_build(tmp_path / "b", shard_sizes=(6, 6))
    script = textwrap.dedent(f"""
        import sys, time
        from motion_data.read.loader import LoaderOptions, make_loader
        if __name__ == "__main__":
            opts = LoaderOptions(batch_size=2, num_workers=2, persistent_workers=True, epoch_size=8, device="cpu")
            dl = make_loader({str(root)!r}, opts, split="all")
            next(iter(dl))
            print("ready", flush=True)
            time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        workers = descendants(p.pid)
        kill_and_expect_orphans_gone(p, workers)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_exit_with_parent_kills_a_child_of_a_killed_process():
    child = "from motion_data.common.parent_death import exit_with_parent; import time; exit_with_parent(); time.sleep(120)"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        c = subprocess.Popen([sys.executable, "-c", {child!r}])
        time.sleep(1.0)  # the child has armed itself
        print(c.pid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        assert running(pid)
        kill_and_expect_orphans_gone(p, {pid})
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("pdeathsig", [True, False])
def test_exit_with_parent_when_the_main_process_is_already_gone(pdeathsig):
    # the race: the main process died before the worker armed itself -> exit at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = ("import time, motion_data.common.parent_death as pd\n"
            + ("" if pdeathsig else "pd._set_pdeathsig = lambda s: False\n")
            + f"pd.exit_with_parent({dead.pid}); time.sleep(30)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=20)
    assert r.returncode == 1


def test_fallback_watcher_exits_when_the_parent_goes():
    # where prctl is unavailable a thread polls the parent id
    child = ("import time, motion_data.common.parent_death as pd; pd._set_pdeathsig = lambda s: False; pd.POLL_S = 0.05; "
             "pd.exit_with_parent(); time.sleep(120)")
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        c = subprocess.Popen([sys.executable, "-c", {child!r}])
        time.sleep(1.0)
        print(c.pid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        kill_and_expect_orphans_gone(p, {pid})
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_far_worker_outlives_its_middle_parent_but_not_the_main_process():
    # a DataLoader worker's parent is the fork server, which a group SIGTERM (torchrun, a
    # scheduler) ends while the trainer is still saving: the worker must follow the trainer only
    worker = ("import os, sys, time; from motion_data.common.parent_death import exit_with_parent; "
              "exit_with_parent(int(sys.argv[1])); print('armed', os.getpid(), flush=True); time.sleep(120)")
    middle = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}, sys.argv[1]]); time.sleep(120)"
    main = textwrap.dedent(f"""
        import os, subprocess, sys, time
        m = subprocess.Popen([sys.executable, "-c", {middle!r}, str(os.getpid())])
        print("middle", m.pid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", main], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, text=True)
    try:
        got = dict(p.stdout.readline().split() for _ in range(2))  # both lines, in either order
        mid, worker_pid = int(got["middle"]), int(got["armed"])
        os.kill(mid, signal.SIGTERM)
        time.sleep(1.5)
        assert running(worker_pid), "the worker died with its middle parent"
        kill_and_expect_orphans_gone(p, {worker_pid})
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
