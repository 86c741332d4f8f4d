"""Two-process DDP (gloo, CPU) runs of the loader: equal batch counts, no hang."""
import json
import os
import socket
import time

import pytest
import torch.multiprocessing as mp

from loader_fixtures import write_build

TIMEOUT_S = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(fn, root, out):
    """``fn(rank, 2, port, root, out)`` in two spawned processes; a hang fails after TIMEOUT_S."""
    ctx = mp.start_processes(fn, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"DDP loader run did not finish within {TIMEOUT_S}s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _worker(rank, world, port, root, out):
    import datetime

    import torch
    import torch.distributed as dist

    from motion_data.read.loader import LoaderOptions, make_loader
    from motion_data.read.sampler import SamplerConfig
    from motion_data.common.static_filter import StaticFilter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    flt = StaticFilter(enable=True, min_keep=4)
    result = {}
    runs = {
        "exact": (dict(split="train", sampler=SamplerConfig(method="dynamic_ratio")), 23),
        "streaming": (dict(split="train", sampler=SamplerConfig(method="dynamic_ratio", mode="streaming")), 23),
        "val": (dict(split="val"), None),
    }
    for name, (kw, epoch_size) in runs.items():
        opts = LoaderOptions(batch_size=3, epoch_size=epoch_size, seed=4, rank=rank, world_size=world)
        ld = make_loader(root, opts, static_filter=flt, val_split=0.3, **kw)
        counts, ids = [], []
        for epoch in range(2):
            ld.set_epoch(epoch)
            n = 0
            for b in ld:
                # a collective per batch: uneven batch counts would hang here (until timeout)
                t = torch.tensor([float(len(b["clip_id"]))])
                dist.all_reduce(t)
                n += 1
                if epoch == 0:
                    ids.extend(b["clip_id"])
            counts.append(n)
        result[name] = {"counts": counts, "len": len(ld), "ids": ids}
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_two_rank_ddp_equal_batches_uneven_shards(tmp_path):
    # shards of 7, 2 and 5 clips, 14 clips, 3 sources -> uneven everything
    root = write_build(tmp_path / "b", shard_sizes=(7, 2, 5), sources=["x.h5", "y.h5", "z.h5"], stride=20)
    _run_two_ranks(_worker, root, tmp_path)
    r = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(2)]
    for name in ("exact", "streaming", "val"):
        assert r[0][name]["counts"] == r[1][name]["counts"] == [r[0][name]["len"]] * 2, name
    # exact: 23 clips per epoch over 2 ranks of batch 3 -> 3 batches each, disjoint draws
    assert r[0]["exact"]["len"] == 3
    assert len(r[0]["exact"]["ids"]) == len(r[1]["exact"]["ids"]) == 9
    # validation: the ranks split the held-out clips without overlap
    assert set(r[0]["val"]["ids"]).isdisjoint(r[1]["val"]["ids"])
    assert r[0]["val"]["ids"] and r[1]["val"]["ids"]


def _weights_worker(rank, world, port, root, out):
    """Rank 1 would compute the clip weights in another float order (one ulp apart); the
    loader's weights and draws still agree bit for bit (rank 0's are broadcast)."""
    import datetime

    import numpy as np
    import torch.distributed as dist

    import motion_data.read.loader as L
    from motion_data.read.sampler import SamplerConfig
    from motion_data.common.static_filter import StaticFilter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    real = L.sampling_weights
    mine = {}

    def other_order(*a):
        w = real(*a)
        if rank == 1:  # one ulp off, as another summation order gives
            w = np.nextafter(w, 2.0)
        mine["w"] = w
        return w

    L.sampling_weights = other_order
    sampler = SamplerConfig(method="dynamic_ratio", shard_affinity=True, affinity_window=2)
    ld = L.make_loader(root, L.LoaderOptions(batch_size=2, seed=4, rank=rank, world_size=world),
                       static_filter=StaticFilter(enable=True, min_keep=4), sampler=sampler, val_split=0.3)
    got = ld.batch_sampler.weights
    res = {"computed": mine.get("w", np.zeros(0)).tobytes().hex(), "used": got.tobytes().hex(),
           "draw": ld.batch_sampler.epoch_draw(3).tolist(), "ids": [i for b in ld for i in b["clip_id"]]}
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"w{rank}.json"), "w") as f:
        json.dump(res, f)


def test_clip_weights_are_rank_zeros_on_every_rank(tmp_path):
    root = write_build(tmp_path / "b", shard_sizes=(7, 2, 5, 6), sources=["x.h5", "y.h5", "z.h5"], stride=20)
    _run_two_ranks(_weights_worker, root, tmp_path)
    r = [json.load(open(tmp_path / f"w{k}.json")) for k in range(2)]
    assert r[1]["computed"] == ""  # only rank 0 computes
    assert r[0]["used"] == r[1]["used"] == r[0]["computed"]  # bit-identical: rank 0's
    assert r[0]["draw"] == r[1]["draw"]
    assert len(r[0]["ids"]) == len(r[1]["ids"]) > 0
