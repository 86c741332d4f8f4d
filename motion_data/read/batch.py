"""Batch assembly: raw arrays of B clips -> the batch dict of the binding contract.

Keys (docs/DESIGN.md): ``positions`` ``(B, T, N, 2)`` float32 reference pixels,
``velocities`` ``(B, S, N, 2)`` float32 ``normalize(diff(positions))``, ``labels``
``(B, S, N)`` int64 (the build's rule on ``positions``), ``mask`` (static filter AND valid),
``valid``, ``eval_mask`` (the build's recorded filter AND valid), ``clip_id`` list and
``dynamic_ratio`` ``(B,)``.

Labels come from ``label_kernels._clip_labels`` (``label_kernels._label_step``'s rule), the one numba label function (the numpy reference is
``labels.labels_from_positions``; tests/test_loader.py compares them). A DataLoader worker
(``packed=True``) sends only what cannot be derived cheaply: positions, visibility, narrow
labels and the two kept-point masks, in one shared-memory buffer; ``unpack_batch`` derives
velocities, valid steps and masks in the main process in one pass (``_derive_kernel``).
Velocities follow from positions, not the reverse (DESIGN.md "Units and labels").
"""
from __future__ import annotations

import math
from collections import namedtuple
from contextlib import contextmanager
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from motion_data.read.augment import AugmentConfig, augment_batch
from motion_data.common.labels import DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, step_valid
from motion_data.common.label_kernels import _clip_labels, label_spec
from motion_data.common.static_filter import METRICS, DEFAULT_FILTER, StaticFilter
from motion_data.build.stats import keep_mask


@contextmanager
def _numba_threads(n: int):
    torch_prev = torch.get_num_threads()  # first: numba starting its threading layer may change it
    prev = numba.get_num_threads()
    numba.set_num_threads(min(n, prev))
    try:
        yield
    finally:
        numba.set_num_threads(prev)
        # numba's OpenMP layer sets the process-wide OpenMP count that torch's ops read too:
        # restore torch's, or a trainer set to one thread runs its ops on more (other float sums)
        if torch.get_num_threads() != torch_prev:
            torch.set_num_threads(torch_prev)


# ----------------------------------------------------------------------------- kernels

# A batch's input arrays as the kernels take them: positions (B, T, N, 2), visibility
# (B, T, N), kept points of the run's filter and of the evaluation filter (B, N).
ClipArrays = namedtuple("ClipArrays", "pos vis keep keep_eval")
# The contract arrays derived from them, but labels: velocities (B, S, N, 2) and the
# (B, S, N) mask, valid steps and eval mask.
DerivedArrays = namedtuple("DerivedArrays", "velocities mask valid eval_mask")


@numba.njit(cache=True, inline="always")
def _derive_clip(clips, b, h, out):
    """Normalised velocities, valid steps, mask and eval mask of clip b (``DerivedArrays``
    ``out``); contiguous rows of one step at a time, so the loops vectorise."""
    pos, vis, keep, keep_eval = clips
    v_out, mask_out, valid_out, eval_out = out
    T, N = vis.shape[1], vis.shape[2]
    one = np.float32(1.0)
    for t in range(T - 1):
        pa = pos[b, t].reshape(-1)
        pb = pos[b, t + 1].reshape(-1)
        vo = v_out[b, t].reshape(-1)
        for i in range(2 * N):
            vo[i] = min(max((pb[i] - pa[i]) / h, -one), one)
        va, vb, ke, kv = vis[b, t], vis[b, t + 1], keep[b], keep_eval[b]
        mo, vd, eo = mask_out[b, t], valid_out[b, t], eval_out[b, t]
        for n in range(N):
            ok = va[n] & vb[n]
            vd[n] = ok
            mo[n] = ke[n] & ok
            eo[n] = kv[n] & ok


@numba.njit(cache=True)
def _batch_kernel(clips, spec, lab_out, out):
    """In-process batches: ``labels.normalize(velocities(pos))``,
    ``labels.labels_from_positions`` (by ``label_kernels._clip_labels`` under the
    ``LabelSpec`` ``spec``), ``step_valid`` and both masks; tests/test_loader.py checks it
    against those functions."""
    B, T, N = clips.vis.shape
    h = np.float32((spec.W - 1) / 2.0)
    q = np.empty((T, 2 * N), np.int32)
    for b in range(B):
        _clip_labels(clips.pos, b, spec, q, lab_out[b])
        _derive_clip(clips, b, h, out)


@numba.njit(cache=True)
def _label_kernel(pos, spec, lab_out):
    """Labels only (what a worker computes): ``labels.labels_from_positions``."""
    B, T, N, _ = pos.shape
    q = np.empty((T, 2 * N), np.int32)
    for b in range(B):
        _clip_labels(pos, b, spec, q, lab_out[b])


@numba.njit(cache=True)
def _derive_kernel(clips, lab_in, W, lab_out, out):
    """A worker's batch in the main process: velocities, valid, masks, and the narrow labels
    widened to int64, in one pass."""
    B = clips.vis.shape[0]
    h = np.float32((W - 1) / 2.0)
    flat_in, flat_out = lab_in.reshape(-1), lab_out.reshape(-1)
    for i in range(flat_in.shape[0]):
        flat_out[i] = flat_in[i]
    for b in range(B):
        _derive_clip(clips, b, h, out)


# ----------------------------------------------------------------------------- assembly

def label_dtype(W: int):
    """Smallest integer type that holds every class id (uint8 for W <= 15): what a worker
    sends; ``unpack_batch`` widens it to the contract's int64 in the main process."""
    return np.uint8 if W * W <= 256 else np.int16


def _keep(stats, vc, flt: StaticFilter) -> np.ndarray:
    """``(B, N)`` kept points of a batch under ``flt`` (every point when it is off); ``vc``
    ``(B, N)`` valid-step counts."""
    B, N = vc.shape
    if not (flt.enable and B):
        return np.ones((B, N), bool)
    with _numba_threads(1):  # thread start-up costs more than a batch's keep mask
        return keep_mask(stats[:, METRICS.index(flt.metric)], vc, flt.threshold, flt.min_keep)


@dataclass(frozen=True)
class BatchRecipe:
    """What turns a batch's raw arrays into the contract dict: the run's static filter, the
    label window W, the build's reference size and label rule, its recorded filter
    (``eval_mask``, whatever ``flt`` is) and the augmentation (None: off)."""
    flt: StaticFilter
    W: int
    augment: AugmentConfig | None = None
    ref_size: int = DEFAULT_REF_SIZE
    label_rule: str = DEFAULT_LABEL_RULE
    # a factory: dataclasses refuse an unhashable default such as a StaticFilter
    eval_filter: StaticFilter = field(default_factory=lambda: DEFAULT_FILTER)

    @classmethod
    def of_build(cls, build, flt: StaticFilter, augment: AugmentConfig | None = None,
                 eval_filter: StaticFilter = DEFAULT_FILTER) -> BatchRecipe:
        """The recipe of a build's batches (``folder.BuildDir``: its W, ref_size, label_rule)."""
        return cls(flt, build.W, augment, build.ref_size, build.label_rule, eval_filter)


def make_batch(pos_px: np.ndarray, vis: np.ndarray, stats: np.ndarray, clip_ids: list, recipe: BatchRecipe,
               rng: np.random.Generator | None = None, *, packed: bool = False,
               into: torch.Tensor | None = None) -> dict:
    """Raw arrays of B clips -> the batch dict, made as ``recipe`` says.

    pos_px ``(B, T, N, 2)`` reference pixels, vis ``(B, T, N)``, stats ``(B, 3, N)`` the
    stored per-point ``METRICS`` scores. Labels come from the positions the model's
    velocities come from (augmented ones, drawn from ``rng``, when the augmentation is on).
    numpy/numba, not torch: torch's intra-op threads only slow small element-wise work down
    in a loader process.

    ``packed=True`` (what DataLoader workers send): one buffer in shared memory holding
    positions, visibility, labels in ``label_dtype(W)`` and the kept-point masks, under half
    the bytes of the contract dict; ``unpack_batch`` makes the contract dict of it (same
    values). ``into``: bytes (a ``worker_ring`` slot) to pack into instead of a new buffer.
    """
    B, T, N = vis.shape
    S, W = T - 1, recipe.W
    pos_px = np.ascontiguousarray(pos_px, np.float32)
    vis = np.ascontiguousarray(vis, np.bool_)
    vc = step_valid(vis).sum(axis=1, dtype=np.uint8)  # once for both masks
    keep = _keep(stats, vc, recipe.flt)
    keep_eval = keep if recipe.eval_filter == recipe.flt else _keep(stats, vc, recipe.eval_filter)
    spec = label_spec(W, recipe.ref_size, recipe.label_rule)
    if recipe.augment is not None and recipe.augment.enabled:
        pos_px = augment_batch(pos_px, keep, recipe.augment, rng, W)
    if packed:
        buf, (p, dyn, labels, v_, k_, ke_) = _alloc(_packed_layout(B, S, N, label_dtype(W)), into)
        p[...] = pos_px
        v_[...] = vis
        k_[...] = keep
        ke_[...] = keep_eval
        keep.mean(axis=1, dtype=np.float32, out=dyn)
        _label_kernel(p, spec, labels)
        return {"_packed": buf, "_shape": (B, S, N, W), "clip_id": list(clip_ids)}
    out = _contract_arrays(B, S, N, positions=False)
    out["positions"] = torch.from_numpy(pos_px)  # shares memory with pos_px (not copied)
    n = {k: v.numpy() for k, v in out.items()}
    _batch_kernel(ClipArrays(pos_px, vis, keep, keep_eval), spec, n["labels"], _derived(n))
    out["dynamic_ratio"] = torch.from_numpy(keep.mean(axis=1, dtype=np.float32))
    out["clip_id"] = list(clip_ids)
    return out


def _derived(arrays: dict) -> DerivedArrays:
    """The kernels' outputs among the numpy views of the contract arrays."""
    return DerivedArrays(*(arrays[k] for k in DerivedArrays._fields))


def _contract_arrays(B, S, N, pin: bool = False, positions: bool = True) -> dict:
    """Empty contract tensors (pinned when ``pin``), but ``positions`` and ``dynamic_ratio``
    when not ``positions`` (the caller has them)."""
    def e(shape, dt):
        return torch.empty(shape, dtype=dt, pin_memory=pin)

    out = {"velocities": e((B, S, N, 2), torch.float32), "labels": e((B, S, N), torch.int64),
           "mask": e((B, S, N), torch.bool), "valid": e((B, S, N), torch.bool), "eval_mask": e((B, S, N), torch.bool)}
    if positions:
        out.update(positions=e((B, S + 1, N, 2), torch.float32), dynamic_ratio=e((B,), torch.float32))
    return out


def _packed_layout(B, S, N, lab_dtype):
    """(dtype, shape) of a worker's arrays in buffer order: positions, dynamic ratio, labels,
    visibility, kept points, kept points of the evaluation filter (4-byte items first)."""
    return [(np.float32, (B, S + 1, N, 2)), (np.float32, (B,)), (lab_dtype, (B, S, N)), (np.bool_, (B, S + 1, N)),
            (np.bool_, (B, N)), (np.bool_, (B, N))]


def _sections(layout):
    out, off = [], 0
    for dt, shape in layout:
        n = math.prod(shape) * np.dtype(dt).itemsize
        out.append((off, n))
        off += (n + 7) // 8 * 8
    return out, off


def packed_bytes(B, S, N, W) -> int:
    """Size of a packed batch of at most B clips."""
    return _sections(_packed_layout(B, S, N, label_dtype(W)))[1]


def _alloc(layout, into: torch.Tensor | None = None):
    """One byte buffer for the arrays and their numpy views. Inside a DataLoader worker it
    lives in shared memory from the start (as torch's default_collate does), so sending it
    to the main process neither copies it nor needs more than one descriptor."""
    secs, total = _sections(layout)
    buf = into[:total] if into is not None else None
    if buf is None and torch.utils.data.get_worker_info() is not None:
        try:
            buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
        except (AttributeError, RuntimeError, TypeError):
            buf = None
    if buf is None:
        buf = torch.empty(total, dtype=torch.uint8)
    raw = buf.numpy()
    return buf, [raw[o:o + n].view(dt).reshape(shape) for (o, n), (dt, shape) in zip(secs, layout)]


def unpack_batch(batch: dict, pin: bool = False, ring=None) -> dict:
    """A worker's packed batch -> the contract dict (in pinned memory when ``pin``); other
    batches pass through unchanged. ``_packed`` is the buffer, or a slot of ``ring``
    (``worker_ring.WorkerRing``), which is copied out here: the worker reuses it."""
    if "_packed" not in batch:
        return batch
    B, S, N, W = batch.pop("_shape")
    layout = _packed_layout(B, S, N, label_dtype(W))
    secs, total = _sections(layout)
    buf = batch.pop("_packed")
    from_ring = not torch.is_tensor(buf)
    buf = ring.slot(int(buf))[:total] if from_ring else buf
    raw = buf.numpy()
    pos, dyn, lab, vis, keep, keep_eval = [raw[o:o + n].view(dt).reshape(sh)
                                           for (o, n), (dt, sh) in zip(secs, layout)]
    out = _contract_arrays(B, S, N, pin, positions=from_ring)
    n = {k: v.numpy() for k, v in out.items()}
    if from_ring:
        n["positions"][...] = pos
        n["dynamic_ratio"][...] = dyn
    else:  # positions and dynamic ratio stay views of the (shared, or pinned) buffer
        (po, pn), (do, dn) = secs[0], secs[1]
        out["positions"] = buf[po:po + pn].view(torch.float32).view(B, S + 1, N, 2)
        out["dynamic_ratio"] = buf[do:do + dn].view(torch.float32)
    _derive_kernel(ClipArrays(pos, vis, keep, keep_eval), lab, W, n["labels"], _derived(n))
    out["clip_id"] = batch.pop("clip_id")
    out.update(batch)
    return out
