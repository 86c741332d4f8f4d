"""Ctrl-C and SIGTERM (what clusters send) during training: finish the step, save, stop.

While ``StopSignals`` is entered, SIGINT and SIGTERM only set a flag. The trainer asks
``agreed()`` at points every rank reaches (after each optimizer step, after each epoch), so
under torchrun all ranks stop at the same step even when one rank alone got the signal, and
save one checkpoint together. A second Ctrl-C quits at once (a plain KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from tokenizer_train.common import distributed as D


class Stopped(KeyboardInterrupt):
    """A stop signal honoured at a safe point. From training: after its checkpoint was saved
    (``step``, ``run_dir``); from a validation pass (``step`` None): the trainer saves, then
    raises its own. A KeyboardInterrupt, so a caller that does not know it (ablate, demo)
    stops as on Ctrl-C."""

    def __init__(self, signum: int, step: int | None = None, run_dir=None, world_size: int = 1):
        self.signum, self.world_size = int(signum), world_size
        self.step = None if step is None else int(step)
        self.run_dir = None if run_dir is None else Path(run_dir)
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal

    def resume_command(self) -> str:
        launcher = ("python -m tokenizer_train" if self.world_size == 1
                    else f"torchrun --nproc-per-node {self.world_size} -m tokenizer_train")
        return f"{launcher} train --resume {self.run_dir}"

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.run_dir is None:
            return f"stopped by {name}"
        return (f"stopped by {name} at step {self.step}, checkpoint saved "
                f"({self.run_dir / 'last.pt'}); resume with: {self.resume_command()}")


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``signum`` instead of ending the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            # None: a handler installed outside Python, which cannot be restored: the default then,
            # never ours (a later Ctrl-C would only set a flag nobody reads)
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal any rank got (0: none). Collective under DDP: every rank calls it at the
        same point of the loop."""
        return D.agree_max(self.signum)
