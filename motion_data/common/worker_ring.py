"""Shared-memory slots that DataLoader workers write their packed batches into.

A new shared segment per batch costs, per 64-clip batch, a segment creation and page faults
in the worker plus a descriptor hand-off (a socket connection), a new mapping and page
faults in the main process: more than the batch's own work. The ring is made
once by the main process and inherited by the workers; worker ``w`` cycles through its
own ``per_worker`` slots and sends only the slot number. Safe because a worker has at most
``prefetch_factor`` batches in flight and the main process copies a batch out of its slot
(``batch.unpack_batch``) before it asks for the next one, so ``prefetch_factor + 2`` slots
per worker are never overwritten while read.
"""
from __future__ import annotations

import os

import torch


class WorkerRing:
    def __init__(self, n_workers: int, per_worker: int, slot_bytes: int):
        self.per_worker, self.slot_bytes = int(per_worker), (int(slot_bytes) + 63) // 64 * 64
        self.buf = torch.empty(n_workers * self.per_worker * self.slot_bytes, dtype=torch.uint8).share_memory_()
        self._count = 0  # batches written by this process (each worker has its own copy)

    def next_slot(self) -> tuple[int, torch.Tensor]:
        """(slot number, its bytes) for this worker's next batch."""
        info = torch.utils.data.get_worker_info()
        slot = info.id * self.per_worker + self._count % self.per_worker
        self._count += 1
        return slot, self.slot(slot)

    def slot(self, k: int) -> torch.Tensor:
        return self.buf[k * self.slot_bytes:(k + 1) * self.slot_bytes]


def make_ring(n_workers: int, prefetch_factor: int | None, slot_bytes: int) -> WorkerRing | None:
    """A ring for ``n_workers`` (``prefetch_factor + 2`` slots each, torch's default factor 2),
    or None (per-batch segments) when shared memory has not twice its size free."""
    per = (prefetch_factor or 2) + 2
    need = n_workers * per * slot_bytes
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize < 2 * need:
            return None
    except OSError:
        return None
    return WorkerRing(n_workers, per, slot_bytes)
