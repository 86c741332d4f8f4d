"""The numba label functions used inside every kernel (statistics, histograms, batches).

``labels.py`` is their reference (numpy and torch, docs/DESIGN.md "Labels"); the tests compare
them on random and edge-case positions under both rules (``tests/test_stats.py``,
``tests/test_loader.py``). Rule codes: 0 amplify, 1 velocity (``labels.rule_code``).
"""
from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np

from motion_data.common.labels import rule_code

# A label rule as the kernels take it (one tuple argument in nopython mode): window W, the
# quantisation bound ref_size - 1 and ``labels.rule_code`` of the rule.
LabelSpec = namedtuple("LabelSpec", "W ref_max rule")


def label_spec(W: int, ref_size: int, rule: str) -> LabelSpec:
    """The kernels' form of a build's label rule (typed the same on every call, so one
    compiled version serves all)."""
    return LabelSpec(int(W), float(ref_size - 1), rule_code(rule))


@numba.njit(cache=True, inline="always")
def _round_half_even(x):
    # np.rint compiles to the rint intrinsic (half to even, like numpy); a floor-and-compare
    # version was the kernels' hot spot
    return np.rint(x)


@numba.njit(cache=True, inline="always")
def _label(vx, vy, W):
    c = W // 2
    col = min(max(_round_half_even(vx) + c, 0.0), W - 1.0)
    row = min(max(_round_half_even(vy) + c, 0.0), W - 1.0)
    return int(row) * W + int(col)


@numba.njit(cache=True, inline="always")
def _quantize(p, ref_max):
    """AMPLIFY's ``round(clip(p, 0, ref_size - 1))`` (``labels.quantize_positions``)."""
    return _round_half_even(min(max(p, 0.0), ref_max))


@numba.njit(cache=True, inline="always")
def _label_step(ax, ay, bx, by, vx, vy, spec):
    """Label of the step from (ax, ay) to (bx, by) with displacement (vx, vy) under ``spec``
    (a ``LabelSpec``): rule 0 (amplify) differences the quantised positions, rule 1
    (velocity) rounds (vx, vy); ``labels.labels_from_positions`` is the reference."""
    W, ref_max = spec.W, spec.ref_max
    if spec.rule == 0:
        return _label(_quantize(bx, ref_max) - _quantize(ax, ref_max), _quantize(by, ref_max) - _quantize(ay, ref_max), W)
    return _label(vx, vy, W)


@numba.njit(cache=True, inline="always")
def _clip_labels(pos, ci, spec, q, lab_out):
    """Labels ``(S, N)`` of clip ``ci`` of ``pos`` into ``lab_out`` ``(S, N)`` under ``spec``:
    ``_label_step``'s rule in integers, each frame's positions quantised once (rule 0,
    amplify), so the point loops vectorise; ``q`` is a ``(T, 2N)`` int32 scratch buffer.
    ``round(clip(p, 0, ref_max))`` equals ``clip(round(p), 0, ref_max)`` for integer bounds;
    values are clamped to a float range first only so that the int conversion is defined.
    tests/test_stats.py and tests/test_loader.py compare it with ``labels.labels_from_positions``."""
    T, N = pos.shape[1], pos.shape[2]
    W, ref_max = spec.W, spec.ref_max
    c = W // 2
    top = np.int32(ref_max)
    if spec.rule == 0:
        lo, hi = np.float32(-1.0), np.float32(ref_max + 1.0)
        for t in range(T):
            p = pos[ci, t].reshape(-1)
            qt = q[t]
            for i in range(2 * N):
                r = np.int32(np.rint(min(max(p[i], lo), hi)))
                qt[i] = min(max(r, np.int32(0)), top)
        for t in range(T - 1):
            a, b, o = q[t], q[t + 1], lab_out[t]
            for n in range(N):
                col = min(max(b[2 * n] - a[2 * n] + c, 0), W - 1)
                row = min(max(b[2 * n + 1] - a[2 * n + 1] + c, 0), W - 1)
                o[n] = row * W + col
    else:
        lo, hi = np.float32(-W), np.float32(W)
        for t in range(T - 1):
            a, b, o = pos[ci, t].reshape(-1), pos[ci, t + 1].reshape(-1), lab_out[t]
            for n in range(N):
                dx = np.int32(np.rint(min(max(b[2 * n] - a[2 * n], lo), hi)))
                dy = np.int32(np.rint(min(max(b[2 * n + 1] - a[2 * n + 1], lo), hi)))
                o[n] = min(max(dy + c, 0), W - 1) * W + min(max(dx + c, 0), W - 1)
