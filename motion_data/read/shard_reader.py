"""The one reader of shard samples: byte ranges from the manifest, parsed and checked.

Every path that reads a sample (the loader's batches, streaming mode, ``verify_build``,
the exact sweep, the tests) goes through ``read_batch`` / ``read_sample``:
  1. each sample's byte range (DESIGN.md "Artifacts": the manifest's ``offset``/``size``)
     into one buffer, from a range source (``ranges``: ``FdCache`` for a local folder,
     ``RemoteRanges`` for object storage); a range past the end of its file is refused
     before anything is allocated;
  2. one numba pass (``_scan_kernel``) over the tar headers: exactly the four plain ustar
     members ``<key>.json``, ``.pos.npy``, ``.stats.npy``, ``.vis.npy`` (the writer's order),
     header checksums valid, nothing outside the range;
  3. one numba pass (``_copy_kernel``) that compares each ``.npy`` header with the one the
     build's shape gives (dtype and shape, no pickles) and copies the data out;
  4. ``check_arrays``: finite values and the manifest's CRC-32 (``shards.array_checksum``).
Any failure is a ``DataError`` naming the shard, offset and clip, so skip mode counts it;
running out of descriptors is an ``OSError`` (the process limit), never blamed on a shard.
"""
from __future__ import annotations

import ast
import json
import math
import zlib
from collections import namedtuple
from dataclasses import dataclass

import numba
import numpy as np

from motion_data.build.shards import _npy_bytes
from motion_data.common.errors import DataError
from motion_data.read.ranges import FdCache

# member order inside a sample (webdataset sorts by extension); the copy kernel reads 1..3
MEMBER_EXTS = ("json", "pos.npy", "stats.npy", "vis.npy")
_REBUILD = "rebuild it with `python -m preprocess build-shards`"


# ----------------------------------------------------------------------------- kernels

@numba.njit(cache=True, inline="always")
def _octal(buf, a, n):
    """Value of a NUL/space-terminated octal field, -1 when malformed."""
    i = a
    while i < a + n and buf[i] == 32:
        i += 1
    v = 0
    digits = 0
    while i < a + n and 48 <= buf[i] <= 55:
        v = v * 8 + (buf[i] - 48)
        i += 1
        digits += 1
    if digits == 0 or (i < a + n and buf[i] != 0 and buf[i] != 32):
        return -1
    return v


# scan outcome codes (``_describe`` says what each means)
OK, BAD_HEADER, BAD_NAME, BAD_LAYOUT, BAD_NPY, BAD_BOOL = 0, 1, 2, 3, 4, 5

# the names a scan expects: each sample's key bytes (B, L) and length, each member's extension (4, 16) and length
MemberNames = namedtuple("MemberNames", "keys key_len exts ext_len")
# what a scan finds: each member's data offset in the buffer and length (B, 4), each sample's outcome and where
TarScan = namedtuple("TarScan", "data_at data_len code where")
# the build's exact .npy headers of members 1..3 (3, L), their lengths and the data sizes after them (3,)
NpyHeads = namedtuple("NpyHeads", "heads head_len nbytes")
# copy destinations, a row per sample: flat float32 pos and stats, uint8 visibility
FlatRows = namedtuple("FlatRows", "pos stats vis")


@numba.njit(cache=True)
def _scan_kernel(buf, starts, sizes, names, scan):
    """Tar structure of each sample range ``buf[starts[j]:starts[j] + sizes[j]]``: exactly
    the four plain ustar members ``<key>.<ext>`` of ``names`` (a ``MemberNames``) in order,
    valid header checksums, data inside the range. Fills the ``TarScan`` ``scan``: member
    data ``data_at``/``data_len``; ``code[j]`` OK or the failure, ``where[j]`` the header
    offset (in ``buf``) where it was found."""
    keys, key_len, exts, ext_len = names
    data_at, data_len, code, where = scan
    B = starts.shape[0]
    for j in range(B):
        code[j] = OK
        pos = starts[j]
        end = pos + sizes[j]
        m = 0
        while pos < end:
            where[j] = pos
            if m >= 4 or pos + 512 > end:
                code[j] = BAD_LAYOUT
                break
            chk = _octal(buf, pos + 148, 8)
            tot = 256  # the checksum field counted as 8 spaces
            for i in range(512):
                if i < 148 or i >= 156:
                    tot += buf[pos + i]
            size = _octal(buf, pos + 124, 12)
            typ = buf[pos + 156]
            if chk != tot or size < 0 or (typ != 48 and typ != 0) or buf[pos + 345] != 0:
                code[j] = BAD_HEADER  # also: PAX/GNU headers, links, directories, name prefixes
                break
            kl = key_len[j]
            el = ext_len[m]
            nl = kl + 1 + el
            ok = nl < 100 and buf[pos + nl] == 0 and buf[pos + kl] == 46
            for i in range(kl):
                ok = ok and buf[pos + i] == keys[j, i]
            for i in range(el):
                ok = ok and buf[pos + kl + 1 + i] == exts[m, i]
            if not ok:
                code[j] = BAD_NAME
                break
            data = pos + 512
            if data + size > end:
                code[j] = BAD_LAYOUT
                break
            data_at[j, m] = data
            data_len[j, m] = size
            pos = data + (size + 511) // 512 * 512
            m += 1
        if code[j] == OK and (m != 4 or pos != end):
            where[j] = starts[j]
            code[j] = BAD_LAYOUT


@numba.njit(cache=True)
def _copy_kernel(buf, buf32, scan, npy, dest, out):
    """For each OK sample j of the ``TarScan`` ``scan``: its three ``.npy`` members (pos,
    stats, vis) must be exactly the expected header plus ``nbytes`` of data (``NpyHeads``
    ``npy``); copy the data into row ``dest[j]`` of the ``FlatRows`` ``out`` (float members
    as float32 words: ``buf32`` is ``buf`` viewed as float32, and npy data starts 64-byte
    aligned inside 512-byte aligned ranges; vis bytes must be 0/1). Failures set ``code[j]``."""
    data_at, data_len, code, _ = scan
    heads, head_len, nbytes = npy
    pos_out, st_out, vis_out = out
    B = data_at.shape[0]
    for j in range(B):
        if code[j] != OK:
            continue
        for q in range(3):
            a = data_at[j, q + 1]
            hl = head_len[q]
            if data_len[j, q + 1] != hl + nbytes[q] or (q < 2 and (a + hl) % 4 != 0):
                code[j] = BAD_NPY
                break
            for i in range(hl):
                if buf[a + i] != heads[q, i]:
                    code[j] = BAD_NPY
                    break
        if code[j] != OK:
            continue
        d = dest[j]
        a = (data_at[j, 1] + head_len[0]) // 4
        pos_out[d, :] = buf32[a:a + nbytes[0] // 4]
        a = (data_at[j, 2] + head_len[1]) // 4
        st_out[d, :] = buf32[a:a + nbytes[1] // 4]
        a = data_at[j, 3] + head_len[2]
        bad = 0
        for i in range(nbytes[2]):
            v = buf[a + i]
            vis_out[d, i] = v
            bad |= v
        if bad > 1:
            code[j] = BAD_BOOL


# ----------------------------------------------------------------------------- layout

def array_specs(T: int, N: int):
    """(dtype, shape) of the sample's arrays in member order 1..3 (pos, stats, vis)."""
    return [(np.dtype(np.float32), (T, N, 2)), (np.dtype(np.float32), (3, N)), (np.dtype(np.bool_), (T, N))]


_EXPECTED: dict = {}


def _expected(T: int, N: int):
    """Per-shape constants of the copy kernel: the exact ``.npy`` headers and data sizes."""
    got = _EXPECTED.get((T, N))
    if got is None:
        specs = array_specs(T, N)
        heads = [_npy_bytes(np.zeros(sh, dt))[:-(math.prod(sh) * dt.itemsize) or None] for dt, sh in specs]
        H = np.zeros((3, max(map(len, heads))), np.uint8)
        for q, h in enumerate(heads):
            H[q, :len(h)] = np.frombuffer(h, np.uint8)
        got = NpyHeads(H, np.array([len(h) for h in heads], np.int64),
                       np.array([math.prod(sh) * dt.itemsize for dt, sh in specs], np.int64))
        if len(_EXPECTED) < 16:
            _EXPECTED[(T, N)] = got
    return got


_EXTS = np.zeros((4, 16), np.uint8)
for _m, _e in enumerate(MEMBER_EXTS):
    _EXTS[_m, :len(_e)] = np.frombuffer(_e.encode(), np.uint8)
_EXT_LEN = np.array([len(e) for e in MEMBER_EXTS], np.int64)


def _scan(buf, starts, sizes, keys: list[str]) -> TarScan:
    """``_scan_kernel`` over the ranges of the samples ``keys``."""
    enc = [k.encode() for k in keys]
    B = len(enc)
    K = np.zeros((B, max(1, max(map(len, enc), default=1))), np.uint8)
    for j, k in enumerate(enc):
        K[j, :len(k)] = np.frombuffer(k, np.uint8)
    names = MemberNames(K, np.array([len(k) for k in enc], np.int64), _EXTS, _EXT_LEN)
    scan = TarScan(np.zeros((B, 4), np.int64), np.zeros((B, 4), np.int64), np.zeros(B, np.int64), np.zeros(B, np.int64))
    _scan_kernel(buf, starts, sizes, names, scan)
    return scan


def _name_at(buf, at: int) -> str:
    raw = bytes(buf[at:at + 100]).split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace")


def _describe(code: int, buf, at: int, key: str) -> str:
    if code == BAD_NAME:
        name = _name_at(buf, at)
        if name.startswith("/") or ".." in name.split("/"):
            return f"unsafe member name {name!r}"
        if name.partition(".")[0] != key:
            return f"member {name!r} does not belong to sample {key!r}"
        return f"member {name!r} is not the expected {key}.<{'|'.join(MEMBER_EXTS)}> in order"
    return {BAD_HEADER: "corrupt tar header (bad checksum, size or member type)",
            BAD_LAYOUT: f"the byte range is not exactly the four members {', '.join(MEMBER_EXTS)}",
            BAD_NPY: "an array member has another dtype or shape than the build's",
            BAD_BOOL: "visibility bytes other than 0/1"}[code]


# ----------------------------------------------------------------------------- checks

def crc32_rows(pos: np.ndarray, vis: np.ndarray, st: np.ndarray) -> np.ndarray:
    """``shards.array_checksum`` of each row of contiguous batch arrays (CRC-32 of the bytes
    of pos, vis, stats in that order), as int64."""
    out = np.empty(pos.shape[0], np.int64)
    for j in range(pos.shape[0]):
        out[j] = zlib.crc32(st[j], zlib.crc32(vis[j], zlib.crc32(pos[j])))
    return out


def check_arrays(pos, vis, st, checksum, where: list[str], ok: np.ndarray, errors: list) -> None:
    """Refuse rows with non-finite values or a CRC-32 other than the manifest's ``checksum``
    (``None``: not checked): ``ok[j] = False`` and ``errors[j]`` the DataError's text."""
    B = pos.shape[0]
    fin = np.isfinite(pos.reshape(B, -1)).all(1) & np.isfinite(st.reshape(B, -1)).all(1)
    crc = crc32_rows(pos, vis, st) if checksum is not None else None
    for j in np.flatnonzero(ok):
        if not fin[j]:
            ok[j] = False
            errors[j] = f"{where[j]}: non-finite values in the sample; {_REBUILD}"
        elif crc is not None and crc[j] != int(checksum[j]):
            ok[j] = False
            errors[j] = (f"{where[j]}: checksum mismatch (manifest {int(checksum[j]):#010x}, data {int(crc[j]):#010x}): "
                         f"the shard is damaged; {_REBUILD}")


# ----------------------------------------------------------------------------- reading

def read_ranges(fds, paths: list, offsets, sizes, where: list[str], ok: np.ndarray, errors: list):
    """One buffer holding each sample's byte range (file order is the caller's ``paths``
    order), and ``starts``; a range that cannot be read marks its row failed."""
    B = len(paths)
    sizes = np.asarray(sizes, np.int64)
    offsets = np.asarray(offsets, np.int64)
    for j in range(B):
        if not ok[j]:
            continue
        try:
            fsize = fds.file_size(paths[j])
        except DataError as e:
            ok[j], errors[j] = False, f"{e} ({where[j]})"
            continue
        # bound by the file: a damaged manifest never makes us allocate its size
        if offsets[j] < 0 or sizes[j] < 0 or offsets[j] + sizes[j] > fsize:
            ok[j] = False
            errors[j] = (f"{where[j]}: byte range {offsets[j]}+{sizes[j]} lies outside the shard "
                         f"({fsize} bytes): truncated shard or damaged manifest; {_REBUILD}")
    used = np.where(ok, sizes, 0)
    starts = np.zeros(B, np.int64)
    starts[1:] = np.cumsum(used)[:-1]
    buf = np.empty((int(used.sum()) + 3) // 4 * 4, np.uint8)  # whole float32 words
    mv = memoryview(buf)
    todo = np.flatnonzero(ok)
    runs, members = [], []
    k = 0
    while k < len(todo):
        # a run of ranges adjacent in the same file (consecutive samples): one read
        e = k + 1
        while (e < len(todo) and paths[todo[e]] == paths[todo[k]]
               and offsets[todo[e]] == offsets[todo[e - 1]] + sizes[todo[e - 1]]):
            e += 1
        run = todo[k:e]
        runs.append((paths[run[0]], int(offsets[run[0]]), int(starts[run[0]]), int(used[run].sum())))
        members.append(run)
        k = e
    for (path, off, _, n), run, (got, msg) in zip(runs, members, fds.read_runs(runs, mv)):
        if got != n:
            for j in run:
                ok[j] = False
                errors[j] = (f"{where[j]}: {msg}" if msg else
                             f"{where[j]}: truncated shard (wanted {n} bytes from offset {off}, got {got})")
    return buf, starts, np.where(ok, sizes, 0)


@dataclass(frozen=True)
class SampleRefs:
    """B samples as the manifest records them: shard ``paths``, byte ``offsets`` and
    ``sizes``, ``keys`` (clip ids) and CRC-32s ``checksum`` (None: not checked)."""
    paths: list
    offsets: list | np.ndarray
    sizes: list | np.ndarray
    keys: list
    checksum: list | np.ndarray | None = None


def read_batch(fds, refs: SampleRefs, T: int, N: int, *, dest=None, out=None):
    """Read and check the B samples ``refs`` (requests in file order read fastest): ``(pos
    (B,T,N,2) float32, vis (B,T,N) bool, stats (B,3,N) float32, ok (B,) bool, errors)``,
    request j in row ``dest[j]`` (default j) of each. Rows with ``ok`` False hold garbage and
    their ``errors`` entry the DataError text naming the shard; ``refs.checksum`` None skips
    the CRC (only ``read_sample`` without a manifest). ``out`` = (pos, vis, stats) to fill."""
    paths, keys, checksum = refs.paths, refs.keys, refs.checksum
    B = len(paths)
    where = [f"{p}@{int(o)} ({k})" for p, o, k in zip(paths, refs.offsets, keys)]
    ok = np.ones(B, bool)
    errors: list = [None] * B
    if out is None:
        out = (np.empty((B, T, N, 2), np.float32), np.empty((B, T, N), np.bool_), np.empty((B, 3, N), np.float32))
    pos, vis, st = out
    if B == 0:
        return pos, vis, st, ok, errors
    dest = np.arange(B, dtype=np.int64) if dest is None else np.asarray(dest, np.int64)
    buf, starts, sizes = read_ranges(fds, paths, refs.offsets, refs.sizes, where, ok, errors)
    scan = _scan(buf, starts, sizes, keys)
    code, at = scan.code, scan.where
    code[~ok] = -1
    _copy_kernel(buf, buf.view(np.float32), scan, _expected(T, N), dest,
                 FlatRows(pos.reshape(B, -1), st.reshape(B, -1), vis.reshape(B, -1).view(np.uint8)))
    for j in np.flatnonzero(ok & (code != OK)):
        ok[j] = False
        errors[j] = f"{where[j]}: {_describe(int(code[j]), buf, int(at[j]), keys[j])}; {_REBUILD}"
    # from here on, output row order
    ok_out = np.empty(B, bool)
    ok_out[dest] = ok
    err_out, where_out, ck_out = [None] * B, [None] * B, None if checksum is None else [0] * B
    for j, d in enumerate(dest):
        err_out[d], where_out[d] = errors[j], where[j]
        if ck_out is not None:
            ck_out[d] = int(checksum[j])
    check_arrays(pos, vis, st, ck_out, where_out, ok_out, err_out)
    return pos, vis, st, ok_out, err_out


def _npy_shape(blob, start: int, end: int):
    """(dtype, shape) from a ``.npy`` header (never unpickles); None when malformed."""
    b = bytes(blob[start:min(end, start + 4096)])
    if b[:6] != b"\x93NUMPY" or len(b) < 10:
        return None
    hlen, h0 = (int.from_bytes(b[8:10], "little"), 10) if b[6] == 1 else (int.from_bytes(b[8:12], "little"), 12)
    try:
        d = ast.literal_eval(b[h0:h0 + hlen].decode("latin1"))
        return np.dtype(d["descr"]), tuple(int(x) for x in d["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None


def read_sample(shard, offset: int, size: int, key: str | None = None, checksum: int | None = None,
                fds: FdCache | None = None) -> dict:
    """One sample by its byte range, through ``read_batch``: ``pos``, ``vis``, ``stats``,
    ``meta`` (the json member), ``checksum`` (CRC-32 of the arrays), ``key``. The shape
    is read from the ``pos.npy`` header (T, N) when no build is at hand; with ``checksum``
    (the manifest's) the arrays must match it. DataError naming the shard otherwise."""
    fds = fds or FdCache(2)
    where = f"{shard}@{int(offset)}" + (f" ({key})" if key else "")
    ok = np.ones(1, bool)
    errors: list = [None]
    buf, starts, sizes = read_ranges(fds, [shard], [offset], [size], [where], ok, errors)
    if not ok[0]:
        raise DataError(errors[0])
    if key is None:  # the key the first member names
        key = _name_at(buf, 0).partition(".")[0]
    scan = _scan(buf, starts, sizes, [key])
    if scan.code[0] != OK:
        raise DataError(f"{where}: {_describe(int(scan.code[0]), buf, int(scan.where[0]), key)}; {_REBUILD}")
    data_at, data_len = scan.data_at, scan.data_len
    spec = _npy_shape(buf, int(data_at[0, 1]), int(data_at[0, 1] + data_len[0, 1]))
    if spec is None or spec[0] != np.float32 or len(spec[1]) != 3 or spec[1][2] != 2:
        raise DataError(f"{where}: pos.npy is not a (T, N, 2) float32 array; {_REBUILD}")
    T, N = spec[1][:2]
    refs = SampleRefs([shard], [offset], [size], [key], None if checksum is None else [checksum])
    pos, vis, st, ok2, err2 = read_batch(fds, refs, T, N)
    if not ok2[0]:
        raise DataError(err2[0].replace(f"{shard}@{int(offset)} ({key})", where, 1))
    a, n = int(data_at[0, 0]), int(data_len[0, 0])
    try:
        meta = json.loads(bytes(buf[a:a + n]))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed json member ({e}); {_REBUILD}") from None
    return {"pos": pos[0], "vis": vis[0], "stats": st[0], "meta": meta, "key": key,
            "checksum": int(crc32_rows(pos, vis, st)[0])}
