"""Where a build or an input lives: a local folder (a ``pathlib.Path``) or an fsspec URL.

``location(x)`` gives a ``Path`` for a local path or ``file://`` URL, else a :class:`Url`
(``s3://``, ``gs://``, ``https://``, ``memory://``, ...) with the few ``Path`` methods the
readers use (``/``, ``name``, ``exists``, ``read_bytes``, ``open``). Remote access needs the
``[cloud]`` extra (fsspec, s3fs).

Credentials and endpoints come from where each filesystem looks (for S3 the environment:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and ``~/.aws``), plus
the JSON object in ``MOTION_STORAGE_OPTIONS`` (what ``--storage-options`` sets), passed to the
filesystem as keyword arguments. Nothing here ever puts them in a message.

Fork safety: a ``Url`` makes its filesystem object lazily, once per process (an fsspec or
s3fs object is not fork-safe), and never pickles one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from motion_data.common.errors import SettingError

OPTIONS_ENV = "MOTION_STORAGE_OPTIONS"
ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS", "FSSPEC_", "AZURE_")  # where filesystems read endpoints and credentials


@dataclass(frozen=True)
class CacheSpec:
    """A node-local cache of whole remote shards: its folder and its bound in bytes
    (``data.cache_dir``, ``data.cache_bytes``; ``motion_data.read.shard_cache``)."""
    dir: str
    bytes: int


def with_cache(root, cache_dir, cache_bytes):
    """``root`` as a location whose shards go through the cache (remote builds only: a local
    folder is returned as it is, and so is everything when ``cache_dir`` is unset)."""
    root = location(root)
    if not cache_dir or not isinstance(root, Url):
        return root
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes <= 0:
        raise SettingError(f"data.cache_bytes must be a positive whole number of bytes with data.cache_dir (e.g. "
                           f"200000000000), got {cache_bytes!r}")
    return Url(root.url, CacheSpec(os.path.abspath(os.path.expanduser(str(cache_dir))), int(cache_bytes)))


def sha256_file(path, chunk: int = 8 << 20) -> str:
    """The sha256 hex digest of a local file's bytes (read ``chunk`` bytes at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_url(x) -> bool:
    """Whether ``x`` names a non-local location (a URL whose scheme is not ``file``)."""
    if isinstance(x, Url):
        return True
    s = str(x)
    return "://" in s and not s.startswith("file://")


def storage_options() -> dict:
    """The JSON object in ``MOTION_STORAGE_OPTIONS`` (empty when unset)."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError:
        opts = None
    if not isinstance(opts, dict):
        raise SettingError(f"{OPTIONS_ENV} (or --storage-options) must be a JSON object of filesystem options")
    return opts


def set_storage_options(text: str | None) -> None:
    """What ``--storage-options JSON`` does: checked, then put in the environment so that
    loader workers and child processes see it too."""
    if text:
        os.environ[OPTIONS_ENV] = text
        storage_options()


def location(x):
    """``Path`` for a local path (or ``file://`` URL), :class:`Url` for anything remote."""
    if isinstance(x, (Path, Url)):
        return x
    s = os.fspath(x)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return Url(s) if is_url(s) else Path(s)


_FS: dict = {}  # (pid, protocol, options, credential variables) -> filesystem: one per process, never inherited


def filesystem(protocol: str):
    """The filesystem object of ``protocol`` for this process and the current options."""
    opts = storage_options()
    # the environment's endpoint and credentials are part of the key: a changed one gets a new object
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    key = (os.getpid(), protocol, json.dumps(opts, sort_keys=True), tuple(env))
    fs = _FS.get(key)
    if fs is None:
        try:
            import fsspec
        except ImportError:
            raise SettingError(f"{protocol}:// locations need the cloud extra: pip install -e '.[cloud]'") from None
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
        except (ImportError, ValueError, TypeError) as e:
            raise SettingError(f"no filesystem for {protocol}:// ({type(e).__name__}: {e}); "
                               f"pip install -e '.[cloud]' or the fsspec package for it") from None
        _FS[key] = fs
    return fs


class Url:
    """A remote object or prefix, e.g. ``s3://bucket/build``; joins with ``/`` like a Path."""

    def __init__(self, url: str, cache: CacheSpec | None = None):
        self.url = str(url).rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self.cache = cache  # shards read through a node-local cache (``with_cache``)

    @property
    def fs(self):
        """This process's filesystem object for the URL's protocol (made on first use)."""
        return filesystem(self.protocol)

    @property
    def path(self) -> str:
        """The filesystem's own name of the object (``bucket/key`` for s3, the URL for http)."""
        return self.fs._strip_protocol(self.url)

    def __truediv__(self, part) -> "Url":
        return Url(f"{self.url}/{str(part).strip('/')}", self.cache)

    def __str__(self):
        return self.url

    def __repr__(self):
        return f"Url({self.url!r})"

    def __eq__(self, other):
        return isinstance(other, Url) and other.url == self.url

    def __hash__(self):
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Url":
        return Url(self.url.rsplit("/", 1)[0], self.cache)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def size(self) -> int:
        return int(self.fs.size(self.path))
