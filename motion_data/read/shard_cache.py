"""A node-local cache of whole remote shards (``data.cache_dir``, bounded by ``data.cache_bytes``).

Why whole shards: one GET per shard replaces a request per batch and shard, and once the
draws are grouped by shard (``data.sampler.shard_affinity``) each shard is fetched once and
read many times. Without grouping a batch of B clips touches about B shards, so this cache
would fetch far more bytes than the range reads it replaces; leave it off then.

Files: ``<key>.<sha256 prefix>.tar``, where ``key`` hashes the shard's URL, size and ETag (a
rebuilt shard is a new key, never a stale hit) and the sha256 prefix is that of the bytes as
downloaded. Each process re-hashes a cached file the first time it uses it, so a file
altered on disk (or torn by a crash) is dropped and fetched again, never read. Writes are
atomic (temporary name, then rename), and a per-key ``flock`` makes the loader workers and ranks of one node fetch
each shard once. Use order is the files' mtime (touched on use); after a fetch the oldest
files go until the total is within ``cache_bytes``. A file evicted while another process
reads it stays readable through its open descriptor; such files (at most each process's open
descriptors) and the small ``.lock`` files are not counted in the bound.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

from motion_data.common.storage import CacheSpec, sha256_file

CHUNK = 8 << 20  # bytes per read while copying a shard in (and per hash read)
TOUCH_S = 10.0  # a process re-touches a file it uses at most this often
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a fetch that was killed


class _Hashed:
    """A file being written and the sha256 of what was written; ``truncate()`` starts both over."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)

    def seek(self, pos: int):
        return self.f.seek(pos)

    def truncate(self):
        self.h = hashlib.sha256()
        return self.f.truncate()


def fetch_into(folder: Path, key: str, size: int, fetch) -> Path:
    """``fetch(f)`` into a temporary file, checked for ``size`` bytes, then renamed to
    ``<key>.<sha256 prefix>.tar``. No fsync: a file torn by a crash fails the hash check of
    the next process that uses it and is fetched again."""
    tmp = folder / f".{key}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            out = _Hashed(f)
            fetch(out)
        got = tmp.stat().st_size
        if got != size:
            raise OSError(f"fetched {got} bytes of a {size}-byte shard")
        p = folder / f"{key}.{out.h.hexdigest()[:16]}.tar"
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def evict(folder: Path, bound: int, keep: Path) -> list:
    """Remove the least recently used shards until the folder holds at most ``bound`` bytes
    (``keep`` stays); the paths removed."""
    for p in folder.glob(".*.tmp*"):  # left by a killed fetch
        try:
            if p.stat().st_mtime < time.time() - STALE_TMP_S:
                p.unlink()
        except FileNotFoundError:
            pass
    files = []
    for p in folder.glob("*.tar"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        files.append((st.st_mtime, p.name, p, st.st_size))
    total, gone = sum(f[3] for f in files), []
    for _, _, p, n in sorted(files):
        if total <= bound:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            gone.append(p)
            total -= n
    return gone


def touch(p: Path, touched: dict) -> None:
    """Mark ``p`` used (its mtime: the LRU order), at most every ``TOUCH_S`` per process."""
    now = time.time()
    if now - touched.get(p, 0.0) >= TOUCH_S:
        try:
            os.utime(p)
        except FileNotFoundError:
            pass
        touched[p] = now


class ShardCache:
    """The cache of one process (pickled to workers as its spec alone)."""

    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self.dir = Path(spec.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._checked: dict = {}  # key -> local path verified by this process
        self._touched: dict = {}  # local path -> last touch time
        self.hits = self.fetches = self.fetched_bytes = self.evicted = self.dropped = 0

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    @staticmethod
    def key(url: str, size: int, etag: str | None) -> str:
        return hashlib.sha256(f"{url}\0{size}\0{etag or ''}".encode()).hexdigest()[:32]

    def fits(self, size: int) -> bool:
        return size <= self.spec.bytes

    def _find(self, key: str) -> Path | None:
        for p in self.dir.glob(f"{key}.*.tar"):
            return p
        return None

    def _verified(self, key: str, p: Path) -> bool:
        if self._checked.get(key) == p:
            return True
        try:
            good = sha256_file(p, CHUNK).startswith(p.name.split(".")[1])
        except FileNotFoundError:  # evicted by another process meanwhile
            return False
        if good:
            self._checked[key] = p
            return True
        p.unlink(missing_ok=True)  # altered on disk: fetched again
        self.dropped += 1
        return False

    def forget(self, key: str) -> None:
        """Drop what this process knows of ``key`` (its file went)."""
        self._checked.pop(key, None)

    def get(self, key: str, size: int, fetch) -> Path:
        """The local copy of shard ``key`` (``size`` bytes); ``fetch(f)`` writes the whole
        shard into the open file ``f`` when it is not here yet."""
        p = self._checked.get(key)
        if p is None or not p.exists():
            p = self._find(key)
        if p is not None and self._verified(key, p):
            self.hits += 1
            touch(p, self._touched)
            return p
        with open(self.dir / f".{key}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per shard and node; others wait for it
            try:
                p = self._find(key)
                if p is not None and self._verified(key, p):
                    self.hits += 1
                    return p
                p = fetch_into(self.dir, key, size, fetch)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._checked[key] = p
        self.fetches += 1
        self.fetched_bytes += size
        gone = evict(self.dir, self.spec.bytes, keep=p)
        self.evicted += len(gone)
        self._checked = {k: v for k, v in self._checked.items() if v not in gone}
        return p


def held_bytes(folder) -> int:
    """Bytes the cache folder holds now."""
    total = 0
    for p in Path(folder).glob("*.tar"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total
