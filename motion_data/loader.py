"""The training/validation data loader over a build folder (one entry point: ``make_loader``).

Batches follow the binding contract (docs/DESIGN.md): ``positions`` ``(B, T, N, 2)``
float32 reference pixels, ``velocities`` ``(B, S, N, 2)`` float32 normalised
``normalize(diff(positions))``, ``labels`` ``(B, S, N)`` int64 (the build's label rule on
``positions``), ``mask`` ``(B, S, N)`` bool (static filter AND valid), ``valid``,
``eval_mask`` ``(B, S, N)`` bool (the build's recorded filter AND valid, whatever the run's
filter: every validation figure is scored on it), ``clip_id`` list and ``dynamic_ratio`` ``(B,)``.

Per sample only raw arrays are read (``pos``, ``vis``, the stored per-point ``stats``) and
checked against the manifest's ``checksum``; the static-filter mask (``stats.keep_mask`` on
the batch rows, current filter config), velocities, augmentation and labels are computed
once per batch, vectorised, in ``make_batch``.

Exact mode (default) reads samples by the byte ranges recorded in the manifest. Its hot path
reads a whole batch with ``os.pread`` on cached shard descriptors and parses the plain
ustar members in place; anything unusual (a PAX header, a bad checksum, a short read)
falls back to ``shards.read_sample``, the reference reader, which either reads it or raises
the ``ShardError`` naming the shard. Streaming mode is a webdataset pipeline (see
``_streaming_pipeline``).

Errors: ``on_error="fail"`` raises ``ShardError`` naming the shard; ``"skip"`` drops the
sample from its batch (so the batch is smaller), counts it in ``loader.skipped`` and logs
one warning per sample.
"""
from __future__ import annotations

import ast
import logging
import math
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
import pyarrow.parquet as pq
import torch

from . import shards
from .augment import AugmentConfig, augment_batch
from .labels import (DEFAULT_LABEL_RULE, DEFAULT_REF_SIZE, labels_from_positions, normalize, rule_code, step_valid,
                     velocities)
from .sampler import (IndexBatch, SamplerConfig, SequentialBatchSampler, WeightedBatchSampler, clip_weights,
                      epoch_rng, load_dynamic_ratio)
from .split import split_manifest
from .stats import METRICS, SEED_FILTER, StaticFilter, _label_step, keep_mask, recorded_filter
from .store import StoreError, read_attrs

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")
ON_ERROR = ("fail", "skip")
# manifest columns the loader (and tokenize) read
MANIFEST_COLUMNS = ["clip_id", "source", "split_group", "start_frame", "shard", "offset", "size", "checksum"]


# ----------------------------------------------------------------------------- batch maths

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


@numba.njit(cache=True)
def _batch_kernel(pos, vis, keep, W, ref_max, rule, v_out, lab_out, mask_out, valid_out):
    """One pass of ``labels.normalize(velocities(pos))``, ``labels.labels_from_positions``
    (the rule's numba form, ``stats._label_step``), ``step_valid`` and the loss mask;
    tests/test_loader.py checks it against those functions."""
    B, T, N = vis.shape
    h = np.float32((W - 1) / 2.0)
    one = np.float32(1.0)
    for b in range(B):
        for t in range(T - 1):
            for n in range(N):
                ax, ay = pos[b, t, n, 0], pos[b, t, n, 1]
                bx, by = pos[b, t + 1, n, 0], pos[b, t + 1, n, 1]
                vx = bx - ax
                vy = by - ay
                v_out[b, t, n, 0] = min(max(vx / h, -one), one)
                v_out[b, t, n, 1] = min(max(vy / h, -one), one)
                lab_out[b, t, n] = _label_step(ax, ay, bx, by, vx, vy, W, ref_max, rule)
                ok = vis[b, t, n] and vis[b, t + 1, n]
                valid_out[b, t, n] = ok
                mask_out[b, t, n] = keep[b, n] and ok


def label_dtype(W: int):
    """Smallest integer type that holds every class id (uint8 for W <= 15): what a worker
    sends; ``unpack_batch`` widens it to the contract's int64 in the main process."""
    return np.uint8 if W * W <= 256 else np.int16


def _keep(stats, valid, flt: StaticFilter) -> np.ndarray:
    """``(B, N)`` kept points of a batch under ``flt`` (every point when it is off)."""
    B, _, N = valid.shape
    if not (flt.enable and B):
        return np.ones((B, N), bool)
    vc = valid.sum(axis=1, dtype=np.uint8)
    with _numba_threads(1):  # thread start-up costs more than a batch's keep mask
        return keep_mask(stats[:, METRICS.index(flt.metric)], vc, flt.threshold, flt.min_keep)


def make_batch(pos_px: np.ndarray, vis: np.ndarray, stats: np.ndarray, clip_ids: list, flt: StaticFilter,
               W: int, augment: AugmentConfig | None = None, rng: np.random.Generator | None = None, *,
               ref_size: int = DEFAULT_REF_SIZE, label_rule: str = DEFAULT_LABEL_RULE, packed: bool = False,
               eval_filter: StaticFilter = SEED_FILTER) -> dict:
    """Raw arrays of B clips -> the batch dict.

    pos_px ``(B, T, N, 2)`` reference pixels, vis ``(B, T, N)``, stats ``(B, 3, N)`` the
    stored per-point ``METRICS`` scores; ``ref_size`` and ``label_rule`` are the build's.
    Labels come from the positions the model's velocities come from: the stored ones when
    unaugmented (exactly the build's labels, one fused numba pass), else
    ``labels_from_positions`` of the augmented positions. numpy/numba, not torch:
    torch's intra-op threads only slow small element-wise work down in a loader process.

    ``packed=True`` (what DataLoader workers send) puts every array into one byte buffer,
    labels in ``label_dtype(W)``: one shared-memory segment and one descriptor hand-off per
    batch instead of one per tensor, and under half the bytes (int64 labels were 44% of
    them). ``unpack_batch`` turns it into the contract dict; the values are identical.

    ``eval_filter``: the build's recorded filter (``make_loader`` reads it from the store);
    ``eval_mask`` = its kept points AND valid, whatever ``flt`` is.
    """
    B, T, N = vis.shape
    S = T - 1
    pos_px = np.ascontiguousarray(pos_px, np.float32)
    vis = np.ascontiguousarray(vis, np.bool_)
    valid = step_valid(vis)
    keep = _keep(stats, valid, flt)
    keep_eval = keep if eval_filter == flt else _keep(stats, valid, eval_filter)
    lab_dtype = label_dtype(W) if packed else np.int64
    buf, (p, v, dyn, labels, mask, valid_out, eval_out) = _alloc(_layout(B, S, N, lab_dtype))
    np.logical_and(keep_eval[:, None, :], valid, out=eval_out)
    if augment is not None and augment.enabled:
        p[...] = augment_batch(pos_px, keep, augment, rng, W)
        v[...] = normalize(velocities(p), W)
        labels[...] = labels_from_positions(p, W, ref_size, label_rule)
        valid_out[...] = valid
        mask[...] = keep[:, None, :] & valid
    else:
        p[...] = pos_px
        _batch_kernel(pos_px, vis, keep, W, float(ref_size - 1), rule_code(label_rule), v, labels, mask, valid_out)
    keep.mean(axis=1, dtype=np.float32, out=dyn)
    if packed:
        return {"_packed": buf, "_shape": (B, S, N, W), "clip_id": list(clip_ids)}
    return _views_to_batch(buf, (B, S, N, lab_dtype), list(clip_ids))


def _layout(B, S, N, lab_dtype):
    """(dtype, shape) of the batch arrays in buffer order; 4-byte items first keeps them aligned."""
    return [(np.float32, (B, S + 1, N, 2)), (np.float32, (B, S, N, 2)), (np.float32, (B,)), (lab_dtype, (B, S, N)),
            (np.bool_, (B, S, N)),
            (np.bool_, (B, S, N)), (np.bool_, (B, S, N))]


def _sections(layout):
    out, off = [], 0
    for dt, shape in layout:
        n = math.prod(shape) * np.dtype(dt).itemsize
        out.append((off, n))
        off += (n + 7) // 8 * 8
    return out, off


def _alloc(layout):
    """One byte buffer for all the batch arrays and their numpy views. Inside a DataLoader
    worker it lives in shared memory from the start (as torch's default_collate does), so
    sending the batch to the main process neither copies it nor needs more than one
    descriptor."""
    secs, total = _sections(layout)
    buf = None
    if torch.utils.data.get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(total)
            buf = torch.empty(0, dtype=torch.uint8).set_(storage)
        except (AttributeError, RuntimeError, TypeError):
            buf = None
    if buf is None:
        buf = torch.empty(total, dtype=torch.uint8)
    raw = buf.numpy()
    views = [raw[o:o + n].view(dt).reshape(shape) for (o, n), (dt, shape) in zip(secs, layout)]
    return buf, views


_TORCH_DTYPE = {np.dtype(d): t for d, t in ((np.float32, torch.float32), (np.uint8, torch.uint8),
                                             (np.int16, torch.int16), (np.int64, torch.int64),
                                             (np.bool_, torch.bool))}


def _views_to_batch(buf: torch.Tensor, shape, clip_ids: list, pin: bool = False) -> dict:
    B, S, N, lab_dtype = shape
    layout = _layout(B, S, N, lab_dtype)
    secs, _ = _sections(layout)
    t = [buf[o:o + n].view(_TORCH_DTYPE[np.dtype(dt)]).view(sh) for (o, n), (dt, sh) in zip(secs, layout)]
    pos, vel, dyn, labels, mask, valid, eval_mask = t
    if labels.dtype != torch.int64:
        wide = torch.empty(labels.shape, dtype=torch.int64, pin_memory=pin)
        wide.copy_(labels)
        labels = wide
    return {"positions": pos, "velocities": vel, "labels": labels, "mask": mask, "valid": valid,
            "eval_mask": eval_mask, "clip_id": clip_ids, "dynamic_ratio": dyn}


def unpack_batch(batch: dict, pin: bool = False) -> dict:
    """A worker's packed batch -> the contract dict (labels widened to int64 here, in pinned
    memory when ``pin``); other batches pass through unchanged."""
    if "_packed" not in batch:
        return batch
    B, S, N, W = batch.pop("_shape")
    out = _views_to_batch(batch.pop("_packed"), (B, S, N, label_dtype(W)), batch.pop("clip_id"), pin)
    out.update(batch)
    return out


# ----------------------------------------------------------------------------- fast reader

class _Unusual(Exception):
    """The fast parser met something it does not handle; use the reference reader."""


_NPY_HEADERS: dict = {}


def _npy(blob: bytes, start: int, end: int) -> np.ndarray:
    if blob[start:start + 6] != b"\x93NUMPY":
        raise _Unusual
    major = blob[start + 6]
    if major == 1:
        hlen, hstart = int.from_bytes(blob[start + 8:start + 10], "little"), start + 10
    elif major in (2, 3):
        hlen, hstart = int.from_bytes(blob[start + 8:start + 12], "little"), start + 12
    else:
        raise _Unusual
    header = blob[hstart:hstart + hlen]
    spec = _NPY_HEADERS.get(header)
    if spec is None:
        try:
            d = ast.literal_eval(header.decode("latin1"))
            dtype = np.dtype(d["descr"])
            shape = tuple(int(x) for x in d["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError):
            raise _Unusual from None
        if dtype.hasobject or d.get("fortran_order"):
            raise _Unusual
        spec = (dtype, shape, math.prod(shape))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = spec
    dtype, shape, count = spec
    data = hstart + hlen
    if data + count * dtype.itemsize > end:
        raise _Unusual
    return np.frombuffer(blob, dtype, count, data).reshape(shape)


def _pax_overrides(data: bytes) -> dict:
    """``path``/``size`` records of a PAX header (TarWriter's carry only ``mtime``)."""
    if b"path=" not in data and b"size=" not in data:
        return {}
    out, i = {}, 0
    try:
        while i < len(data) and data[i] != 0:
            sp = data.index(b" ", i)
            length = int(data[i:sp])
            k, _, v = data[sp + 1:i + length - 1].decode("utf-8").partition("=")
            out[k] = v
            i += length
    except (ValueError, UnicodeDecodeError):
        raise _Unusual from None
    return out


_CHK_FIELD = np.zeros(512, bool)
_CHK_FIELD[148:156] = True


def parse_sample(blob: bytes, key: str) -> dict:
    """``pos``, ``vis``, ``stats`` of one sample's byte range (ustar members, PAX allowed)."""
    n = len(blob)
    if n % 512:
        raise _Unusual
    members = {}
    pax: dict = {}
    heads, chks = [], []
    pos = 0
    while pos < n:
        hdr = blob[pos:pos + 512]
        try:
            chks.append(int(hdr[148:156].rstrip(b"\0 ")[-7:], 8))
            size = int(hdr[124:136].rstrip(b"\0 "), 8)
        except ValueError:
            raise _Unusual from None
        heads.append(pos >> 9)
        typ = hdr[156]
        data = pos + 512
        pos = data + (size + 511) // 512 * 512
        if typ == 120:  # PAX extended header (TarWriter writes one per member for mtime)
            pax = _pax_overrides(blob[data:data + size])
            continue
        if typ not in (48, 0) or hdr[345] != 0:  # regular file, no ustar prefix
            raise _Unusual
        name = pax.get("path") or hdr[:100].rstrip(b"\0").decode("utf-8", "replace")
        if "size" in pax:
            size = int(pax["size"])
            pos = data + (size + 511) // 512 * 512
        pax = {}
        k, _, ext = name.partition(".")
        if k != key:
            raise _Unusual
        members[ext] = (data, data + size)
    if pos != n or not all(e in members for e in shards.SAMPLE_EXTS):
        raise _Unusual
    # header checksums, all at once: byte sum with the checksum field counted as spaces
    blocks = np.frombuffer(blob, np.uint8).reshape(-1, 512)[heads]
    sums = np.where(_CHK_FIELD, 32, blocks).sum(axis=1)
    if not np.array_equal(sums, chks):
        raise _Unusual
    pos = _npy(blob, *members["pos.npy"])
    vis = _npy(blob, *members["vis.npy"])
    st = _npy(blob, *members["stats.npy"])
    if pos.ndim != 3 or pos.shape[-1] != 2 or vis.shape != pos.shape[:2] or st.shape != (3, pos.shape[1]):
        raise _Unusual
    if pos.dtype != np.float32 or vis.dtype != np.bool_ or st.dtype != np.float32:
        raise _Unusual
    if not (np.isfinite(pos).all() and np.isfinite(st).all()):
        raise _Unusual  # the reference reader names the shard
    return {"pos": pos, "vis": vis, "stats": st, "checksum": shards.array_checksum(pos, vis, st)}


_MEMBER_EXTS = tuple(sorted(shards.SAMPLE_EXTS))  # the writers' member order


@numba.njit(cache=True)
def _octal(buf, a, n):
    """Value of a NUL/space-terminated octal field; -1 when it is not one."""
    v = 0
    i = a
    while i < a + n and buf[i] == 32:
        i += 1
    digits = 0
    while i < a + n and 48 <= buf[i] <= 55:
        v = v * 8 + (buf[i] - 48)
        i += 1
        digits += 1
    if digits == 0 or (i < a + n and buf[i] != 0 and buf[i] != 32):
        return -1
    return v


@numba.njit(cache=True)
def _parse_batch_kernel(buf, buf32, starts, sizes, keys, key_len, exts, ext_len, heads, head_len, nbytes,
                        pos_out, st_out, vis_out, ok):
    """Parse each sample's byte range ``buf[starts[j]:starts[j] + sizes[j]]`` and copy its
    ``.npy`` members' data into row j of ``pos_out``, ``st_out``, ``vis_out`` (flat rows;
    ``buf32`` is ``buf`` viewed as float32). A sample is ``ok`` only when it is
    exactly the four plain ustar members ``<key>.<ext>`` in the writers' order with valid
    header checksums and ``.npy`` headers equal to the expected ones (dtype and shape);
    anything else is left to the reference reader."""
    B = starts.shape[0]
    for j in range(B):
        ok[j] = False
        pos = starts[j]
        end = pos + sizes[j]
        m = 0
        good = True
        data_at = np.empty(4, np.int64)
        data_len = np.empty(4, np.int64)
        while pos < end and good:
            if m >= 4 or pos + 512 > end:
                good = False
                break
            chk = _octal(buf, pos + 148, 8)
            tot = 256  # the checksum field counted as 8 spaces
            for i in range(512):
                if i < 148 or i >= 156:
                    tot += buf[pos + i]
            size = _octal(buf, pos + 124, 12)
            typ = buf[pos + 156]
            if chk != tot or size < 0 or (typ != 48 and typ != 0) or buf[pos + 345] != 0:
                good = False
                break
            # name == key + "." + ext, NUL-terminated inside the 100-byte field
            kl = key_len[j]
            el = ext_len[m]
            nl = kl + 1 + el
            if nl >= 100 or buf[pos + nl] != 0 or buf[pos + kl] != 46:
                good = False
                break
            for i in range(kl):
                if buf[pos + i] != keys[j, i]:
                    good = False
            for i in range(el):
                if buf[pos + kl + 1 + i] != exts[m, i]:
                    good = False
            data = pos + 512
            if data + size > end:
                good = False
                break
            data_at[m] = data
            data_len[m] = size
            pos = data + (size + 511) // 512 * 512
            m += 1
        if not good or m != 4 or pos != end:
            continue
        # members 1..3 are the .npy arrays (pos, stats, vis)
        for q in range(3):
            a = data_at[q + 1]
            hl = head_len[q]
            if data_len[q + 1] != hl + nbytes[q]:
                good = False
                break
            for i in range(hl):
                if buf[a + i] != heads[q, i]:
                    good = False
                    break
        if not good:
            continue
        a = data_at[3] + head_len[2]
        vis_out[j, :] = buf[a:a + nbytes[2]]
        # float members: npy data starts 64-byte aligned (sample ranges are whole 512-byte
        # blocks), so they are copied as float32, which is several times faster than bytes
        a = data_at[1] + head_len[0]
        if a % 4 != 0 or (data_at[2] + head_len[1]) % 4 != 0:
            continue
        a //= 4
        pos_out[j, :] = buf32[a:a + nbytes[0] // 4]
        a = (data_at[2] + head_len[1]) // 4
        st_out[j, :] = buf32[a:a + nbytes[1] // 4]
        ok[j] = True


def _npy_header(shape, dtype) -> bytes:
    return shards._npy_bytes(np.zeros(shape, dtype))[:-int(np.prod(shape)) * np.dtype(dtype).itemsize or None]


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset over manifest rows; ``__getitems__`` returns a whole batch dict."""

    def __init__(self, build_dir, manifest: dict, flt: StaticFilter, W: int, S: int, N: int,
                 augment: AugmentConfig | None = None, seed: int = 0, on_error: str = "fail",
                 eval_filter: StaticFilter = SEED_FILTER):
        """``manifest``: columns ``MANIFEST_COLUMNS`` of the build's manifest; S = T - 1 steps."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(build_dir)
        info = read_build_info(self.root)
        self.ref_size, self.label_rule = info["ref_size"], info["label_rule"]
        self.checksum = np.asarray(manifest["checksum"], np.int64)
        self.shard_paths = sorted(set(manifest["shard"]))
        code = {s: i for i, s in enumerate(self.shard_paths)}
        self.shard_of = np.fromiter((code[s] for s in manifest["shard"]), np.int32, len(manifest["shard"]))
        self.offset = np.asarray(manifest["offset"], np.int64)
        self.size = np.asarray(manifest["size"], np.int64)
        self.clip_id = list(manifest["clip_id"])
        self.flt, self.W, self.S, self.N = flt, W, S, N
        self.augment, self.seed, self.on_error = augment, seed, on_error
        self.eval_filter = eval_filter
        # workers send packed batches only to a MotionLoader, which unpacks them; any other
        # DataLoader over this dataset gets contract dicts
        self.packed = False
        self._fds: dict = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"] = {}  # descriptors are per process
        return d

    def __len__(self):
        return len(self.clip_id)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _path(self, row) -> Path:
        return self.root / self.shard_paths[self.shard_of[row]]

    def _fd(self, row: int) -> int:
        """Read-only descriptor of ``row``'s shard, opened once per shard and process."""
        sid = int(self.shard_of[row])
        fd = self._fds.get(sid)
        if fd is None:
            fd = self._fds[sid] = os.open(self._path(row), os.O_RDONLY)
        return fd

    def read(self, row: int) -> dict:
        """Raw arrays of one clip; ``ShardError`` naming the shard when it cannot be read."""
        row = int(row)
        off, size, key = int(self.offset[row]), int(self.size[row]), self.clip_id[row]
        try:
            blob = os.pread(self._fd(row), size, off)
            if len(blob) != size:
                raise _Unusual
            out = parse_sample(blob, key)
        except (_Unusual, OSError):
            out = shards.read_sample(self._path(row), off, size, key)
        if out["pos"].shape != (self.S + 1, self.N, 2):
            raise shards.ShardError(f"{self._path(row)}@{off} ({key}): clip shape {out['pos'].shape[:2]}, "
                                    f"build says {(self.S + 1, self.N)}")
        shards.check_checksum(out, self.checksum[row], f"{self._path(row)}@{off} ({key})")
        return out

    def __getitem__(self, row):
        return self.read(row)

    def _expected(self):
        """Per-sample constants of the batch parser (npy headers of the build's shapes)."""
        if getattr(self, "_exp", None) is None:
            T, N = self.S + 1, self.N
            specs = [((T, N, 2), np.float32), ((3, N), np.float32), ((T, N), np.bool_)]  # member order
            heads = [_npy_header(sh, dt) for sh, dt in specs]
            H = np.zeros((3, max(map(len, heads))), np.uint8)
            for q, h in enumerate(heads):
                H[q, :len(h)] = np.frombuffer(h, np.uint8)
            E = np.zeros((4, 16), np.uint8)
            for m, e in enumerate(_MEMBER_EXTS):
                E[m, :len(e)] = np.frombuffer(e.encode(), np.uint8)
            self._exp = (E, np.array([len(e) for e in _MEMBER_EXTS], np.int64), H,
                         np.array([len(h) for h in heads], np.int64),
                         np.array([math.prod(sh) * np.dtype(dt).itemsize for sh, dt in specs], np.int64))
        return self._exp

    def _read_fast(self, rows, order, pos, vis, st) -> np.ndarray:
        """Read the batch's byte ranges into one buffer (``os.preadv``, file order) and parse
        them in one numba pass straight into ``pos``/``vis``/``st``. Returns the rows done
        (finite, checksum equal to the manifest's); the others (unusual or damaged samples)
        go through ``read``, which names the problem."""
        B = len(rows)
        done = np.zeros(B, bool)
        if B == 0 or not hasattr(os, "preadv"):
            return done
        sizes = self.size[rows].astype(np.int64)
        starts = np.zeros(B, np.int64)
        starts[order] = np.concatenate([[0], np.cumsum(sizes[order])[:-1]])
        buf = np.empty((int(sizes.sum()) + 3) // 4 * 4, np.uint8)  # whole float32 words
        mv = memoryview(buf)
        readable = np.ones(B, bool)
        for j in order:
            row = rows[j]
            a, n = int(starts[j]), int(sizes[j])
            try:
                readable[j] = os.preadv(self._fd(row), [mv[a:a + n]], int(self.offset[row])) == n
            except OSError:
                readable[j] = False
        keys = [self.clip_id[r].encode() for r in rows]
        K = np.zeros((B, max(map(len, keys))), np.uint8)
        for j, k in enumerate(keys):
            K[j, :len(k)] = np.frombuffer(k, np.uint8)
        E, el, H, hl, nb = self._expected()
        _parse_batch_kernel(buf, buf.view(np.float32), starts, sizes, K, np.array([len(k) for k in keys], np.int64),
                            E, el, H, hl, nb, pos.reshape(B, -1), st.reshape(B, -1), vis.view(np.uint8).reshape(B, -1),
                            done)
        done &= readable
        done &= np.isfinite(pos.reshape(B, -1)).all(1) & np.isfinite(st.reshape(B, -1)).all(1)
        for j in np.flatnonzero(done):
            done[j] = shards.array_checksum(pos[j], vis[j], st[j]) == self.checksum[rows[j]]
        return done

    def __getitems__(self, rows) -> dict:
        key = getattr(rows, "key", (0, 0, 0))  # IndexBatch: seeds this batch's augmentation
        rows = list(rows)
        B = len(rows)
        pos = np.empty((B, self.S + 1, self.N, 2), np.float32)
        vis = np.empty((B, self.S + 1, self.N), bool)
        st = np.empty((B, 3, self.N), np.float32)
        ok = np.ones(B, bool)
        errors = []
        # read in file order: sequential access within each shard
        order = sorted(range(B), key=lambda j: (self.shard_of[rows[j]], self.offset[rows[j]]))
        fast = self._read_fast(rows, order, pos, vis, st)
        for j in order:
            if fast[j]:
                continue
            try:
                s = self.read(rows[j])
            except shards.ShardError as e:
                if self.on_error == "fail":
                    raise
                ok[j] = False
                errors.append(str(e))
                continue
            pos[j], vis[j], st[j] = s["pos"], s["vis"], s["stats"]
        ids = [self.clip_id[r] for r, g in zip(rows, ok) if g]
        if not ok.all():
            pos, vis, st = pos[ok], vis[ok], st[ok]
        rng = epoch_rng(self.seed, *key, 1)
        batch = make_batch(pos, vis, st, ids, self.flt, self.W, self.augment, rng, ref_size=self.ref_size,
                           label_rule=self.label_rule,
                           packed=self.packed and torch.utils.data.get_worker_info() is not None,
                           eval_filter=self.eval_filter)
        batch["skipped"] = errors
        return batch


def _identity(batch):
    return batch


# ----------------------------------------------------------------------------- streaming

class _StreamState:
    """Streaming-mode stages and their shared epoch (a shared-memory tensor, so persistent
    workers see ``set_epoch``); per-worker errors are carried out inside the batches."""

    def __init__(self, root, rel_weight: dict, checksum: dict, flt, W, S, N, augment, seed, rank, on_error,
                 eval_filter=SEED_FILTER):
        self.root, self.rel_weight, self.flt, self.W, self.S, self.N = root, rel_weight, flt, W, S, N
        self.checksum, self.eval_filter = checksum, eval_filter
        info = read_build_info(root)
        self.ref_size, self.label_rule = info["ref_size"], info["label_rule"]
        self.augment, self.seed, self.rank, self.on_error = augment, seed, rank, on_error
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.errors: list = []
        self._rng = None

    def worker_seed(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        return int(epoch_rng(self.seed, int(self.epoch[0]), self.rank, wid).integers(2 ** 62))

    def handler(self, exn):
        if self.on_error == "fail":
            raise shards.ShardError(str(exn)) from exn
        self.errors.append(str(exn))
        return True

    def weighted(self, src):
        """Emit each sample ``floor(m) + Bernoulli(frac(m))`` times, ``m = w / mean(w)``.

        Shards are resampled uniformly, so every clip is visited at the same rate whatever
        its shard's size; the repetition makes its expected frequency proportional to w.
        """
        rng = np.random.default_rng(self.worker_seed())
        self._rng = None  # the augmentation stream restarts with each epoch too
        for sample in src:
            m = self.rel_weight.get(sample["__key__"])
            if m is None:  # not in this split
                continue
            reps = int(m) + (rng.random() < m - int(m))
            if reps == 0:
                continue
            where = f"{sample.get('__url__', '?')} ({sample['__key__']})"
            try:
                d = shards.decode_members({k: v for k, v in sample.items() if not k.startswith("__")}, where)
                if d["pos"].shape != (self.S + 1, self.N, 2):
                    raise shards.ShardError(f"{where}: clip shape {d['pos'].shape[:2]}, "
                                            f"build says {(self.S + 1, self.N)}")
                shards.check_checksum(d, self.checksum[sample["__key__"]], where)
            except shards.ShardError as e:
                if self.on_error == "fail":
                    raise
                self.errors.append(str(e))
                continue
            for _ in range(reps):
                yield sample["__key__"], d

    def collate(self, items):
        pos = np.stack([d["pos"] for _, d in items])
        vis = np.stack([d["vis"] for _, d in items])
        st = np.stack([d["stats"] for _, d in items])
        if self._rng is None:
            self._rng = np.random.default_rng(self.worker_seed() + 1)
        batch = make_batch(pos, vis, st, [k for k, _ in items], self.flt, self.W, self.augment, self._rng,
                           ref_size=self.ref_size, label_rule=self.label_rule,
                           packed=torch.utils.data.get_worker_info() is not None, eval_filter=self.eval_filter)
        batch["skipped"], self.errors = self.errors, []
        return batch


def _streaming_pipeline(state: _StreamState, urls: list, batch_size: int, shuffle_buffer: int):
    import webdataset as wds

    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=state.seed, worker_seed=state.worker_seed, deterministic=True),
        wds.tarfile_to_samples(handler=state.handler),
        state.weighted,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 4 * batch_size)),
        wds.batched(batch_size, collation_fn=state.collate, partial=False),
    )


# ----------------------------------------------------------------------------- the loader

class MotionLoader:
    """Iterable of batches; ``len`` = batches per epoch on this rank.

    Call ``set_epoch(e)`` before each epoch: a different or finished epoch starts at batch
    0, the current unfinished one keeps its (resumed) position. Iterating again after a
    finished epoch without ``set_epoch`` moves on to the next epoch.

    ``state_dict()`` records the epoch and the batches already *delivered* (not merely
    prefetched by workers); after ``load_state_dict()`` the next iteration continues with the
    identical remaining batches (exact mode and validation; streaming mode resumes with the
    right number of remaining batches but a fresh random stream). ``skipped`` counts samples
    dropped by ``on_error="skip"``.

    ``generator`` is the DataLoader's: reseeded from (seed, epoch, rank) before each epoch,
    it gives the workers' base seed, which torch otherwise draws from the global RNG when
    an iteration starts; so starting (or resuming) an epoch leaves the trainer's RNG stream
    (dropout, noise) untouched and a mid-epoch resume replays it exactly.
    """

    def __init__(self, dataloader, batch_sampler=None, stream_state=None, n_batches: int = 0, *,
                 generator: torch.Generator | None = None, seed: int = 0, rank: int = 0, pin: bool = False):
        self.dataloader = dataloader
        self.batch_sampler = batch_sampler
        self.stream_state = stream_state
        self._n_batches = n_batches
        self.generator, self.seed, self.rank, self.pin = generator, seed, rank, pin
        self.epoch = 0
        self.batches_done = 0
        self.skipped = 0
        self.skipped_messages: list[str] = []

    @property
    def dataset(self):
        return self.dataloader.dataset

    def __len__(self):
        return len(self.batch_sampler) if self.batch_sampler is not None else self._n_batches

    def set_epoch(self, epoch: int):
        if int(epoch) != self.epoch or self.batches_done >= len(self):
            self.epoch, self.batches_done = int(epoch), 0
        self._sync_epoch()

    def _sync_epoch(self):
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(self.epoch)
        if self.stream_state is not None:
            self.stream_state.epoch[0] = self.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.skipped = int(state.get("skipped", 0))
        self._sync_epoch()

    def __iter__(self):
        if self.batches_done >= len(self):  # the last epoch was finished: go on with the next
            self.set_epoch(self.epoch + 1)
        if self.batch_sampler is not None:
            self.batch_sampler.start_batch = self.batches_done
        if self.generator is not None:
            self.generator.manual_seed(int(epoch_rng(self.seed, self.epoch, self.rank, 2 ** 31 - 1).integers(2 ** 62)))
        for batch in self.dataloader:
            batch = unpack_batch(batch, self.pin)
            errors = batch.pop("skipped", [])
            if errors:
                self.skipped += len(errors)
                self.skipped_messages.extend(errors[:100])
                for e in errors:
                    log.warning("skipped unreadable sample: %s", e)
            self.batches_done += 1
            yield batch
            if self.batches_done >= len(self):
                break


def _worker_context():
    """Workers come from a forkserver that has imported this module: forking the trainer
    itself is unsafe once numba's OpenMP threads have run in it (the stats kernels do), and
    spawning re-imports torch for every worker of every epoch."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["motion_data.loader"])
    return ctx


def read_build_info(build_dir) -> dict:
    """The build's shape, label parameters and recorded filter (``stats.zarr`` attributes); a
    missing or old-format store is a ValueError with StoreError's one line (folder and way out)."""
    try:
        a = read_attrs(build_dir)
    except StoreError as e:
        raise ValueError(str(e)) from None
    return {"W": int(a["W"]), "T": int(a["T"]), "N": int(a["N"]), "n_clips": int(a["n_clips"]),
            "ref_size": int(a["ref_size"]), "label_rule": str(a["label_rule"]), "build_filter": recorded_filter(a)}


def make_loader(build_dir, *, split: str = "train", static_filter: StaticFilter | None = None,
                sampler: SamplerConfig | None = None, augment: AugmentConfig | None = None, batch_size: int = 32,
                num_workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                epoch_size: int | None = None, val_split: float = 0.1, pin_memory: bool = False,
                persistent_workers: bool = False, on_error: str = "fail", shuffle_buffer: int = 1000,
                prefetch_factor: int | None = None) -> MotionLoader:
    """The data loader of a build folder.

    split: ``train`` (weighted sampler, augmentation), ``val`` (every held-out clip once, in
    order, no weighting or augmentation) or ``all`` (every clip, weighted like train).
    ``epoch_size`` (clips per epoch over all ranks; default ``sampler.epoch_size``, else the
    split's clip count) sets ``len(loader) = max(1, epoch_size // (batch_size * world_size))``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    flt = static_filter or StaticFilter()
    sampler = sampler or SamplerConfig()
    root = Path(build_dir)
    info = read_build_info(root)
    W, T, N = info["W"], info["T"], info["N"]
    man = pq.read_table(root / "manifest.parquet", columns=MANIFEST_COLUMNS).to_pydict()
    if len(man["clip_id"]) != info["n_clips"]:
        raise ValueError(f"{root}: manifest has {len(man['clip_id'])} clips, stats.zarr {info['n_clips']}")
    train_rows, val_rows = split_manifest(man, val_split, T)
    rows = {"train": train_rows, "val": val_rows, "all": np.arange(len(man["clip_id"]))}[split]
    if len(rows) == 0:
        raise ValueError(f"{root}: the {split!r} split is empty (val_split={val_split})")
    training = split != "val"
    aug = augment if (training and augment is not None and augment.enabled) else None
    epoch_size = epoch_size if epoch_size is not None else sampler.epoch_size
    gen = torch.Generator()
    loader_kw = {"generator": gen, "seed": seed, "rank": rank, "pin": bool(pin_memory and torch.cuda.is_available())}
    worker_kw = {}
    if num_workers > 0:
        worker_kw = {"persistent_workers": persistent_workers, "multiprocessing_context": _worker_context()}
        if prefetch_factor is not None:
            worker_kw["prefetch_factor"] = prefetch_factor

    if training and sampler.mode == "streaming":
        weights = clip_weights(load_dynamic_ratio(root, flt)[rows], sampler)
        mean_w = weights.mean()
        rel = {man["clip_id"][r]: float(w / mean_w) for r, w in zip(rows, weights)}
        checksum = {man["clip_id"][r]: int(man["checksum"][r]) for r in rows}
        state = _StreamState(root, rel, checksum, flt, W, T - 1, N, aug, seed, rank, on_error, info["build_filter"])
        urls = [str(root / s) for s in sorted(set(man["shard"]))]
        pipe = _streaming_pipeline(state, urls, batch_size, shuffle_buffer)
        n_batches = max(1, (epoch_size or len(rows)) // (batch_size * world_size))
        import webdataset as wds

        dl = wds.WebLoader(pipe, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                           generator=gen, **worker_kw)
        dl = dl.with_epoch(n_batches)
        return MotionLoader(dl, stream_state=state, n_batches=n_batches, **loader_kw)

    dataset = ClipDataset(root, man, flt, W, T - 1, N, aug, seed, on_error, info["build_filter"])
    dataset.packed = True
    if training:
        weights = clip_weights(load_dynamic_ratio(root, flt)[rows], sampler)
        bs = WeightedBatchSampler(rows, weights, batch_size, epoch_size, seed, rank, world_size)
    else:
        bs = SequentialBatchSampler(rows, batch_size, rank, world_size)
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=bs, collate_fn=_identity, num_workers=num_workers,
                                     pin_memory=pin_memory, generator=gen, **worker_kw)
    return MotionLoader(dl, batch_sampler=bs, **loader_kw)


__all__ = ["make_loader", "make_batch", "MotionLoader", "ClipDataset", "parse_sample", "IndexBatch"]
