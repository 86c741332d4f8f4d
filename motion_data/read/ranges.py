"""Where shard bytes come from: the range sources of the shard reader.

The shard reader asks a range source for ``file_size(path)`` and ``read_runs(runs, buf)``.
``FdCache`` is the local one: ``os.preadv`` on descriptors from a bounded LRU.
``RemoteRanges`` is the one for object storage (s3://, gs://, https://). Per batch it merges
runs of one shard that lie within ``MERGE_GAP`` bytes of each other into one request,
fetches all requests concurrently (fsspec ``cat_ranges``), checks each response's length
(a server that ignores ``Range`` answers with the whole object: refused, naming the shard
and the server, never used), and retries transient failures (5xx, resets, timeouts) with
backoff. The sample checks (tar layout, CRC-32) follow in the shard reader as for local
shards. The filesystem object is made per process (``storage.Url``). A ``Url`` with a
cache (``storage.with_cache``) reads whole shards into ``shard_cache`` and from there.
"""
from __future__ import annotations

import errno
import os
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from motion_data.build.store import REBUILD_HINT
from motion_data.common.errors import DataError
from motion_data.common.storage import Url
from motion_data.read.shard_cache import CHUNK, ShardCache

MERGE_GAP = 1 << 16  # bytes between two runs of one shard that one request still spans
RETRIES = 9  # tries of a failing request, min(BACKOFF_MAX_S, BACKOFF_S * 2**k) apart: about 32 s in all,
BACKOFF_S = 0.25  # long enough for a server restart
BACKOFF_MAX_S = 8.0


def default_max_open() -> int:
    """Descriptors one process keeps: an eighth of its soft ``RLIMIT_NOFILE`` (DataLoader
    workers, shared-memory batches and the trainer need the rest), between 2 and 64."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 1024 if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):
        soft = 1024
    return int(min(64, max(2, soft // 8)))


def _open_readonly(path: str, free) -> int:
    """``os.open`` read-only; out of descriptors, ``free()`` (the cache's own) and once more."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    free()
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        raise OSError(e.errno, f"too many open files in this process while opening {path}: raise the limit "
                               f"(`ulimit -n`) or use fewer loader workers") from None


class FdCache:
    """Read-only descriptors of shard files, the ``max_open`` most recently used kept open.

    ``get`` raises ``DataError`` when the file is missing or unreadable, and ``OSError``
    (EMFILE/ENFILE) when the process has no descriptor left even after closing its own
    cached ones: that is the process limit, not the shard's fault.
    """

    def __init__(self, max_open: int | None = None):
        self.max_open = max(1, int(max_open or default_max_open()))
        self._fds: OrderedDict = OrderedDict()  # path -> (fd, file size)
        self._sizes: dict = {}  # path -> file size (shards do not change while read)

    def __getstate__(self):
        return {"max_open": self.max_open, "_fds": OrderedDict(), "_sizes": {}}  # descriptors are per process

    def __len__(self):
        return len(self._fds)

    def get(self, path) -> tuple[int, int]:
        """(descriptor, file size) of ``path``."""
        path = str(path)
        hit = self._fds.get(path)
        if hit is not None:
            self._fds.move_to_end(path)
            return hit
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1][0])
        try:
            fd = _open_readonly(path, self.close)
        except OSError as e:
            raise DataError(f"{path}: cannot open shard ({e.strerror or e}); {REBUILD_HINT}") from None
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise DataError(f"{path}: cannot stat shard ({e})") from None
        self._fds[path] = (fd, size)
        self._sizes[path] = size
        return fd, size

    def file_size(self, path) -> int:
        size = self._sizes.get(str(path))
        return self.get(path)[1] if size is None else size

    def read_runs(self, runs, buf) -> list:
        """The range-source interface (``RemoteRanges`` is the remote one): fill
        ``buf[at:at + n]`` from ``path`` at ``offset`` per run ``(path, offset, at, n)``;
        ``(got, message)`` per run. Out of descriptors is raised: the process limit."""
        out = []
        for path, off, at, n in runs:
            try:
                # the descriptor is used at once: a later get() may evict and close it
                out.append((os.preadv(self.get(path)[0], [buf[at:at + n]], off), None))
            except DataError as err:
                out.append((-1, str(err)))
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE):
                    raise
                out.append((-1, str(err)))
        return out

    def close(self):
        while self._fds:
            try:
                os.close(self._fds.popitem()[1][0])
            except (OSError, TypeError):  # TypeError: os already torn down at interpreter exit
                pass

    def __del__(self):
        self.close()




def _backoff(k: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_S * 2 ** k)


def transient(e: BaseException) -> bool:
    """Worth another try: not a missing object, a refusal or a client error (4xx)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(e, "status", None) or getattr(e, "code", None)
    return not (isinstance(status, int) and 400 <= status < 500)


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def merge_runs(runs, gap: int = MERGE_GAP) -> list:
    """Requests ``[path, start, end, [run indices]]`` covering ``runs`` ``(path, offset, at,
    n)``: runs of one shard at most ``gap`` bytes apart share one request."""
    reqs: list = []
    for i in sorted(range(len(runs)), key=lambda i: (runs[i][0], runs[i][1])):
        path, off, _, n = runs[i]
        last = reqs[-1] if reqs else None
        if last is not None and last[0] == path and off - last[2] <= gap:
            last[2] = max(last[2], off + n)
            last[3].append(i)
        else:
            reqs.append([path, off, off + n, [i]])
    return reqs


class RemoteRanges:
    """The range source of a remote build (``root``: its ``storage.Url``). With ``root.cache``
    set, whole shards are copied into that node-local cache (``shard_cache``) and read there."""

    def __init__(self, root: Url):
        self.root = root
        self._info: dict = {}  # url -> (size, etag)
        self.requests = self.bytes = self.retries = 0  # requests sent, bytes received, retries (benchmarks, tests)
        self.cache = ShardCache(root.cache) if root.cache is not None else None
        self._local = FdCache() if root.cache is not None else None

    def __getstate__(self):
        return {"root": self.root}  # counters, sizes and descriptors are per process

    def __setstate__(self, state):
        self.__init__(state["root"])

    def _path(self, url: str) -> str:
        return self.root.fs._strip_protocol(url)

    def _stat(self, url: str) -> tuple:
        hit = self._info.get(url)
        if hit is None:
            info = retried(self, url, "stat shard", lambda: self.root.fs.info(self._path(url)))
            etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
            hit = self._info[url] = (int(info["size"]), None if etag is None else str(etag))
        return hit

    def file_size(self, url) -> int:
        return self._stat(str(url))[0]

    def _cached(self, url: str):
        """The local copy of shard ``url``, opened (another process's eviction cannot take it
        away before it is read); None when it does not fit the cache."""
        size, etag = self._stat(url)
        if not self.cache.fits(size):
            return None
        key = self.cache.key(url, size, etag)
        for attempt in range(2):
            p = str(self.cache.get(key, size, lambda f: copy_whole(self, url, f)))
            try:
                self._local.get(p)
                return p
            except DataError:  # evicted between the two: fetched again once
                if attempt:
                    raise
                self.cache.forget(key)

    def read_runs(self, runs, buf) -> list:
        """Fill ``buf[at:at + n]`` from ``path`` at ``offset`` for each run ``(path, offset,
        at, n)``; returns ``(got, message)`` per run (got == n when read)."""
        out = [(-1, None)] * len(runs)
        remote = list(range(len(runs)))
        if self.cache is not None:
            remote, by_path = [], {}
            for i, run in enumerate(runs):
                by_path.setdefault(run[0], []).append(i)
            for path, idx in by_path.items():  # each shard read as soon as it is here (later fetches may evict it)
                try:
                    local = self._cached(path)
                except (DataError, OSError) as e:
                    out = _failed(out, idx, str(e))
                    continue
                if local is None:
                    remote.extend(idx)
                    continue
                for i, res in zip(idx, self._local.read_runs([(local, *runs[i][1:]) for i in idx], buf)):
                    out[i] = res
        if remote:
            for i, res in zip(remote, fetch_ranges(self, [runs[i] for i in remote], buf)):
                out[i] = res
        return out

    def close(self):
        if self.cache is not None:
            self._local.close()


def _failed(out: list, idx, msg: str) -> list:
    for i in idx:
        out[i] = (-1, msg)
    return out


def retried(src: "RemoteRanges", url: str, what: str, call):
    """``call()``, tried again after transient failures (counted on ``src``); one ``DataError``
    naming ``url`` and its server after the last try."""
    for k in range(RETRIES):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (fsspec backends raise their own types)
            if not transient(e) or k == RETRIES - 1:
                raise DataError(f"{url}: cannot {what} on {_server(url)} after {k + 1} tries "
                                f"({type(e).__name__}: {e}); check the URL and credentials, or "
                                f"{REBUILD_HINT}") from None
            src.retries += 1
            time.sleep(_backoff(k))


def copy_whole(src: "RemoteRanges", url: str, f):
    """The whole object ``url`` into the open file ``f``, started over after a transient failure."""
    def once():
        f.seek(0)
        f.truncate()
        src.requests += 1
        with src.root.fs.open(src._path(url), "rb", block_size=CHUNK) as obj:
            while chunk := obj.read(CHUNK):
                f.write(chunk)
                src.bytes += len(chunk)

    retried(src, url, "fetch shard", once)


def fetch_ranges(src: "RemoteRanges", runs, buf) -> list:
    """``RemoteRanges.read_runs`` by merged byte-range requests, retried; counted on ``src``."""
    out = [(-1, None)] * len(runs)
    reqs = merge_runs(runs)
    todo = list(range(len(reqs)))
    for k in range(RETRIES):
        if not todo:
            break
        got = src.root.fs.cat_ranges([src._path(reqs[r][0]) for r in todo], [reqs[r][1] for r in todo],
                                      [reqs[r][2] for r in todo], on_error="return")
        src.requests += len(todo)
        retry = []
        for r, data in zip(todo, got):
            path, a, b, members = reqs[r]
            if isinstance(data, BaseException):
                if transient(data) and k < RETRIES - 1:
                    src.retries += 1
                    retry.append(r)
                    continue
                out = _failed(out, members, f"cannot read bytes {a}-{b} from {_server(path)} after {k + 1} tries "
                                            f"({type(data).__name__}: {data})")
                continue
            src.bytes += len(data)
            if len(data) != b - a:
                out = _failed(out, members, f"{_server(path)} answered {len(data)} bytes for the byte range {a}-{b} "
                                            f"({b - a} bytes): the server ignores Range requests, or the object "
                                            f"changed; serve the build from a server that honours Range (S3, GCS, "
                                            f"nginx), or copy it to a local folder")
                continue
            for i in members:
                _, off, at, n = runs[i]
                buf[at:at + n] = data[off - a:off - a + n]
                out[i] = (n, None)
        todo = retry
        if todo:
            time.sleep(_backoff(k))
    return out



def ranges_for(root):
    """The range source of a build root: ``FdCache`` for a local folder, ``RemoteRanges``
    for a ``storage.Url``."""
    return RemoteRanges(root) if isinstance(root, Url) else FdCache()
