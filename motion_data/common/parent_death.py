"""Worker processes end when the process that started them dies.

A pool worker blocked on its task queue never sees the main process go when that is
killed with SIGKILL (a scheduler, the out-of-memory killer): the queue's pipe stays open
in its sibling workers, so the workers sleep on, parentless. :func:`exit_with_parent`,
called first thing in a worker (a pool initializer, a DataLoader ``worker_init_fn``),
prevents that: on Linux the kernel sends SIGKILL when the parent exits
(``prctl(PR_SET_PDEATHSIG)``).

A forkserver's workers are children of the fork server, not of the main process, and the
fork server does not exit while they live (they hold its "alive" pipe), so PDEATHSIG alone
would wait forever there; a daemon thread then watches the main process itself (a pidfd
where the kernel has them, else polling), and nothing ties them to the fork server, which a
group SIGTERM ends before the trainer has saved. The same thread polls the parent id where prctl
is unavailable (not Linux).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Exists and has not exited: a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): os.kill's answer
        return True


def _pidfd(pid: int | None):
    try:
        return os.pidfd_open(pid) if pid is not None else None
    except (AttributeError, OSError):  # not Linux >= 5.3, or already gone
        return None


def _watch(ppid: int, main_pid: int | None, pidfd) -> None:
    """Exit once ``main_pid`` has exited (when given), else once the parent ``ppid`` has."""
    while (_alive(main_pid) if main_pid is not None else os.getppid() == ppid):
        if pidfd is not None:
            if select.select([pidfd], [], [], POLL_S)[0]:  # main_pid has exited (maybe an unreaped zombie)
                break
        else:
            time.sleep(POLL_S)
    os._exit(1)


def exit_with_parent(main_pid: int | None = None, *_ignored) -> None:
    """Make this process die when its parent, or ``main_pid`` (the process that created
    the pool, when that is not the parent), exits.

    If either is already gone (the parent died between fork and this call), exit now.
    Extra positional arguments are ignored, so a DataLoader can pass its worker id.
    """
    ppid = os.getppid()
    far = main_pid is not None and main_pid != ppid
    # A far parent (a fork server) is in the trainer's process group and dies of the SIGTERM
    # that torchrun or a scheduler sends the group, while the trainer saves first
    # (tokenizer_train/common/stop.py): tie a far worker to main_pid only, not to that parent.
    armed = False if far else _set_pdeathsig(signal.SIGKILL)
    pidfd = _pidfd(main_pid) if far else None  # opened before the check: no pid-reuse race after it
    # the parent may have died before prctl: then we are already someone else's child
    if os.getppid() != ppid or (main_pid is not None and not _alive(main_pid)):
        os._exit(1)
    if far or not armed:
        threading.Thread(target=_watch, args=(ppid, main_pid if far else None, pidfd), name="exit-with-parent",
                         daemon=True).start()
