"""The differentiable code-usage regulariser (stage 1) against FSQ itself."""
import math
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from vector_quantize_pytorch import FSQ

from tokenizer_train.evaluate.code_usage import MAX_EXACT_CODES, code_usage_loss, entropy_weight, soft_code_distribution
from tokenizer_train.model.fsq_geometry import fsq_levels_grid, fsq_prerounding, fsq_prerounding_from_module
from tokenizer_train.evaluate.metrics import code_counts, entropy


def hard_code_entropy(indices, K: int) -> float:
    """Entropy (nats) of the histogram of hard code ids (the logged metric)."""
    return entropy(code_counts(indices.numpy(), K))

LEVELS = [[8, 8, 6, 5], [8, 8, 8, 4], [5, 3], [7]]


@pytest.mark.parametrize("levels", LEVELS)
def test_prerounding_rounds_to_fsq_codes(levels):
    torch.manual_seed(0)
    fsq = FSQ(levels)
    z = torch.randn(2, 300, len(levels)) * 2
    pre = fsq_prerounding(z, levels)
    half_width = torch.tensor([L // 2 for L in levels], dtype=torch.float32)
    assert torch.equal(pre.round() / half_width, fsq.quantize(z))
    # the levels rounding picks from are exactly fsq_levels_grid (all reached for wide z)
    for c, grid in enumerate(fsq_levels_grid(levels)):
        assert torch.equal(torch.unique(pre[..., c].round()), grid)


def test_prerounding_from_module_with_projection():
    torch.manual_seed(1)
    fsq = FSQ([8, 6, 5], dim=16)
    z = torch.randn(3, 40, 16)
    _, idx = fsq(z)
    pre = fsq_prerounding_from_module(fsq, z)
    half_width = torch.tensor([4, 3, 2], dtype=torch.float32)
    assert torch.equal(fsq.codes_to_indices(pre.round() / half_width), idx)


def test_gradient_reaches_encoder_parameters():
    torch.manual_seed(2)
    levels = [8, 8, 6, 5]
    enc = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, len(levels)))
    x = torch.randn(256, 10)
    z = enc(x)
    _, idx = FSQ(levels)(z[None])
    assert not idx.requires_grad  # the hard-id histogram cannot carry a gradient
    for kind in ("entropy", "kl_uniform"):
        enc.zero_grad()
        term, _ = code_usage_loss(fsq_prerounding(enc(x), levels), levels, kind, temperature=0.1)
        term.backward()
        for p in enc.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0


def test_descending_the_term_raises_entropy():
    torch.manual_seed(3)
    levels = [5, 5]
    z = (torch.randn(512, 2) * 0.05).requires_grad_()  # collapsed near one code
    opt = torch.optim.SGD([z], lr=5.0)
    _, h0 = code_usage_loss(fsq_prerounding(z, levels), levels, "entropy", 0.2)
    for _ in range(30):
        opt.zero_grad()
        term, _ = code_usage_loss(fsq_prerounding(z, levels), levels, "entropy", 0.2)
        term.backward()
        opt.step()
    _, h1 = code_usage_loss(fsq_prerounding(z, levels), levels, "entropy", 0.2)
    assert h1 > h0 + 0.2


@pytest.mark.parametrize("levels", [[8, 8, 6, 5], [5, 3]])
def test_soft_entropy_tends_to_hard_entropy(levels):
    torch.manual_seed(4)
    fsq = FSQ(levels)
    z = torch.randn(1, 600, len(levels)) * 1.5
    _, idx = fsq(z)
    K = math.prod(levels)
    hard = hard_code_entropy(idx, K)
    pre = fsq_prerounding(z[0], levels)
    errs = []
    for t in (1.0, 0.1, 1e-2, 1e-5):
        _, hn = code_usage_loss(pre, levels, "entropy", temperature=t)
        errs.append(abs(float(hn) * math.log(K) - hard))
    assert errs[-1] < 1e-4
    assert errs == sorted(errs, reverse=True)
    # and the soft distribution itself becomes the id histogram, in FSQ's index order
    p = soft_code_distribution(pre, levels, 1e-5)
    hist = torch.bincount(idx.reshape(-1).long(), minlength=K).float() / idx.numel()
    assert p.shape == (K,)
    assert torch.allclose(p, hist, atol=1e-4)


def test_kl_is_log_k_minus_entropy():
    torch.manual_seed(5)
    levels = [8, 6, 5]
    K = math.prod(levels)
    pre = fsq_prerounding(torch.randn(200, 3), levels)
    ent, hn = code_usage_loss(pre, levels, "entropy", 0.3)
    kl, hn2 = code_usage_loss(pre, levels, "kl_uniform", 0.3)
    H = float(hn) * math.log(K)
    assert torch.equal(hn, hn2)
    assert float(ent) == pytest.approx(-float(hn), abs=1e-7)
    assert float(kl) == pytest.approx(math.log(K) - H, abs=1e-5)
    assert float(kl) >= 0
    # the distribution is normalised
    p = soft_code_distribution(pre, levels, 0.3)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)


def test_uniform_codes_reach_full_entropy():
    levels = [4, 3]
    grids = fsq_levels_grid(levels)
    pre = torch.cartesian_prod(*grids)  # every code exactly once, on its levels
    term, hn = code_usage_loss(pre, levels, "entropy", 1e-3)
    assert float(hn) == pytest.approx(1.0, abs=1e-5)
    kl, _ = code_usage_loss(pre, levels, "kl_uniform", 1e-3)
    assert float(kl) == pytest.approx(0.0, abs=1e-5)


def _brute_force_distribution(pre, levels, temperature):
    """The joint soft distribution as the full (M, K) outer product (channel 0 fastest)."""
    qs = []
    for c, grid in enumerate(fsq_levels_grid(levels)):
        qs.append(torch.softmax(-(pre[:, c:c + 1] - grid) ** 2 / temperature, dim=-1))
    joint = qs[0]
    for q in qs[1:]:
        joint = (q[:, :, None] * joint[:, None, :]).reshape(pre.shape[0], -1)
    return joint.mean(0)


def test_joint_is_exact_for_dependent_channels():
    torch.manual_seed(6)
    levels = [8, 6, 5]
    same = torch.rand(50, 1).expand(50, 3) * 4 - 2  # fully correlated channels
    p = soft_code_distribution(same, levels, 0.2)
    assert torch.allclose(p, _brute_force_distribution(same, levels, 0.2), atol=1e-6)
    # the sum of the channel marginals' entropies would over-count; the joint does not
    _, hn = code_usage_loss(same, levels, "entropy", 0.2)
    marg = sum(_entropy_of(p.reshape(5, 6, 8).sum(dims)) for dims in ((0, 1), (0, 2), (1, 2)))
    assert float(marg) > float(hn) * math.log(240) + 0.05


def _entropy_of(p):
    return float(-(p * p.clamp_min(1e-30).log()).sum())


def test_large_codebooks_and_low_precision_inputs():
    torch.manual_seed(7)
    levels = [16, 16, 16, 16]  # K = 65536: the joint, via two 256-wide factors
    pre = fsq_prerounding(torch.randn(512, 4), levels)
    p = soft_code_distribution(pre, levels, 0.1)
    assert p.shape == (65536,) and float(p.sum()) == pytest.approx(1.0, abs=1e-4)
    big = [8] * 6  # K = 262144 > 65536: still the exact joint (no per-channel shortcut)
    pre_big = fsq_prerounding(torch.randn(64, 6), big)
    term, hn = code_usage_loss(pre_big, big, "entropy", 0.1)
    ref = _brute_force_distribution(pre_big, big, 0.1)
    assert torch.allclose(soft_code_distribution(pre_big, big, 0.1), ref, atol=1e-7)
    assert float(hn) == pytest.approx(_entropy_of(ref) / math.log(8 ** 6), abs=1e-5)
    t16, h16 = code_usage_loss(pre.bfloat16(), levels, "entropy", 0.1)
    assert t16.dtype == torch.float32 and torch.isfinite(t16)
    small = [8, 8, 6, 5]
    pre = fsq_prerounding(torch.randn(500, 4), small)
    ref = code_usage_loss(pre, small, "entropy", 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer calls it inside autocast
        got = code_usage_loss(pre, small, "entropy", 0.1)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_codebooks_beyond_the_exact_limit_are_refused():
    huge = [16] * 7  # K = 2**28 > MAX_EXACT_CODES
    assert math.prod(huge) > MAX_EXACT_CODES
    with pytest.raises(ValueError, match="model.fsq_levels.*training.code_entropy_weight=0"):
        code_usage_loss(torch.zeros(4, 7), huge, "entropy", 0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="code_entropy_type"):
        code_usage_loss(torch.zeros(4, 2), [5, 5], "histogram", 0.1)
    with pytest.raises(ValueError, match="z_bounded"):
        code_usage_loss(torch.zeros(4, 3), [5, 5], "entropy", 0.1)


def test_warmup_schedule():
    assert entropy_weight(0.1, 2.0, 0.0) == 0.0
    assert entropy_weight(0.1, 2.0, 0.5) == pytest.approx(0.025)
    assert entropy_weight(0.1, 2.0, 1.0) == pytest.approx(0.05)
    assert entropy_weight(0.1, 2.0, 2.0) == pytest.approx(0.1)
    assert entropy_weight(0.1, 2.0, 7.5) == pytest.approx(0.1)
    assert entropy_weight(0.1, 0.0, 0.0) == 0.1  # no warm-up: full weight from the start
    assert entropy_weight(0.0, 3.0, 1.0) == 0.0


# ----------------------------------------------------------------------- DDP (gloo)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, pre_all, splits, levels, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lo, hi = splits[rank], splits[rank + 1]
        mine = pre_all[lo:hi].clone().requires_grad_()
        term, hn = code_usage_loss(mine, levels, "entropy", 0.2, distributed=True)
        term.backward()
        lfq, _ = code_usage_loss(mine.detach(), levels, "entropy", 0.2, distributed=True, token_weight=1.0)
        out[rank] = torch.stack([hn, lfq, mine.grad.abs().sum()])
    finally:
        dist.destroy_process_group()


def test_distributed_distribution_is_the_union():
    torch.manual_seed(8)
    levels = [6, 5]
    pre_all = fsq_prerounding(torch.randn(70, 2), levels)
    splits = [0, 25, 70]  # unequal shares: the token counts are reduced too
    out = torch.zeros(2, 3).share_memory_()
    # spawn, not fork: forking after torch's thread pools have started can deadlock
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), pre_all, splits, levels, out), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo run did not finish")
    _, ref = code_usage_loss(pre_all, levels, "entropy", 0.2)
    ref_lfq, _ = code_usage_loss(pre_all, levels, "entropy", 0.2, token_weight=1.0)  # own entropies: all tokens
    for r in range(2):
        assert float(out[r, 0]) == pytest.approx(float(ref), abs=1e-6)
        assert float(out[r, 1]) == pytest.approx(float(ref_lfq), abs=1e-6)
        assert float(out[r, 2]) > 0
