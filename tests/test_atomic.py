"""motion_data.common.atomic: a write either lands whole under the final name or not at all."""
import os

import pytest

from motion_data.common.atomic import atomic_open, atomic_path, atomic_write_text, temp_path


def test_success_writes_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    with atomic_open(p, "wb") as f:
        f.write(b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with atomic_open(p, "w", newline="") as f:
        f.write("x,y\n")
    assert p.read_text() == "x,y\n"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and tmp.name == f".a.json.tmp{os.getpid()}"
        tmp.write_text("via path")
    assert p.read_text() == "via path"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("how", ["path", "open"])
def test_exception_keeps_old_file_and_removes_temp(tmp_path, how):
    p = tmp_path / "a.npz"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        if how == "path":
            with atomic_path(p) as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("crash mid-write")
        else:
            with atomic_open(p, "wb") as f:
                f.write(b"half")
                raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.npz"]
    assert not temp_path(p).exists()


def test_temp_matches_the_stale_pattern(tmp_path):
    """Cleaners (store.remove_stale, manifest) match ``.NAME.tmp*``."""
    p = tmp_path / "manifest.parquet"
    assert temp_path(p).match(".manifest.parquet.tmp*")


def test_nothing_written_is_an_error_and_leaves_old(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_path(p):
            pass
    assert p.read_text() == "old"


def test_read_mode_refused(tmp_path):
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "a", "r"):
            pass
