"""data.num_workers: auto (the default) picks the workers from the device and the cores."""
import pytest

from loader_fixtures import write_build
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.common.workers import MAX_AUTO, auto_workers, resolve_workers
from tokenizer_train.common.config import from_dict
from motion_data.common.errors import SettingError


def test_auto_rule():
    # CPU device: the model's ops use the cores; in-process loading is cheapest per clip
    for cores in (1, 2, 16, 128):
        assert auto_workers("cpu", cores, 1) == 0
    # CUDA: the rank's share of the cores minus its own process, at most MAX_AUTO
    assert auto_workers("cuda", 2, 1) == 1
    assert auto_workers("cuda", 1, 1) == 0
    assert auto_workers("cuda", 16, 1) == MAX_AUTO == 8
    assert auto_workers("cuda", 16, 4) == 3
    assert auto_workers("cuda", 16, 8) == 1
    assert auto_workers("cuda", 16, 32) == 0


def test_auto_reads_torchruns_ranks_per_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_workers("cuda", 16) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert auto_workers("cuda", 16) == 8


def test_resolve_and_config():
    assert resolve_workers(3, "cuda") == 3 and resolve_workers(0, "cpu") == 0
    assert resolve_workers("auto", "cpu") == 0
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ValueError, match="data.num_workers"):
            resolve_workers(bad, "cpu")
    assert from_dict({}).data.num_workers == "auto"  # the default
    assert from_dict({}, ["data.num_workers=2"]).data.num_workers == 2
    assert from_dict({"data": {"num_workers": "auto"}}).data.num_workers == "auto"
    for bad in ("data.num_workers=-1", "data.num_workers=many"):
        with pytest.raises(SettingError, match="num_workers"):
            from_dict({}, [bad])


def test_make_loader_resolves_auto(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(4, 4))
    ld = make_loader(root, LoaderOptions(batch_size=4, num_workers="auto", device="cpu"), split="all")
    assert ld.dataloader.num_workers == 0 and sum(len(b["clip_id"]) for b in ld) == 8
    ld = make_loader(root, LoaderOptions(batch_size=4, num_workers="auto", device="cuda"), split="all")
    assert ld.dataloader.num_workers == auto_workers("cuda")


def test_worker_ring_only_when_shared_memory_has_room(monkeypatch):
    import os

    from motion_data.common import worker_ring

    class Small:
        f_bavail, f_frsize = 10, 4096  # 40 KiB free

    ring = worker_ring.make_ring(2, None, 1 << 20)
    assert ring is not None and ring.per_worker == 4 and ring.buf.numel() >= 2 * 4 * (1 << 20)
    assert ring.slot(7).numel() == ring.slot_bytes
    monkeypatch.setattr(os, "statvfs", lambda p: Small())
    assert worker_ring.make_ring(2, None, 1 << 20) is None  # per-batch segments instead
