"""Masked decoding (training.decode_points: masked) equals the full-logits path (all).

The decoder computes logits only for the entries the loss or the evaluation mask scores, and
the training loss applies the last layer in chunks (fused_ce). Every head, with and without
the static filter, with class weights, focal loss, logit adjustment and the code-usage
regulariser: the loss, the gradients and every logged figure equal those of the path that
materialises every entry's logits, within float tolerance.
"""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from tokenizer_train.train import trainer as T
from tokenizer_train.train import setup as S
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.fused_ce import IGNORE, linear_ce
from tokenizer_train.model.model import MotionTokenizer
from tokenizer_train.model.model_inputs import flat_index, take, with_index
from tokenizer_train.common.stop import StopSignals
from tokenizer_train.common import distributed as D
from motion_data.build.folder import BuildDir

HEADS = ["additive", "code_query", "amplify"]
LOSS_SIDE = {"code_entropy_weight": 0.1, "class_weighting": {"method": "ring_decay", "center_gamma": 0.2},
             "focal": {"enabled": True, "gamma": 2.0}, "logit_adjustment": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def build(tiny_build):  # a real build: class weights need its histograms
    return tiny_build


# ------------------------------------------------------------------ the fused loss
@pytest.mark.parametrize("offset", [False, True])
def test_linear_ce_equals_cross_entropy_on_materialised_logits(offset):
    g = torch.Generator().manual_seed(0)
    P, H, K = 50, 12, 225
    x = torch.randn(P, H, generator=g, requires_grad=True)
    layer = torch.nn.Linear(H, K)
    target = torch.randint(0, K, (P,), generator=g)
    target[::7] = IGNORE
    off = torch.randn(K, generator=g) if offset else None
    weight_per_row = torch.rand(P, generator=g)  # a downstream factor, as class weights are

    ce, pred = linear_ce(x, layer, target, off, chunk=16)  # several chunks, the last one short
    (ce * weight_per_row).sum().backward()
    got = (ce.detach(), pred, x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = layer.weight.grad = layer.bias.grad = None

    z = layer(x)
    ref_ce = F.cross_entropy(z + (off if offset else 0), target, ignore_index=IGNORE, reduction="none")
    (ref_ce * weight_per_row).sum().backward()
    ref = (ref_ce.detach(), z.argmax(-1), x.grad, layer.weight.grad, layer.bias.grad)
    for a, b in zip(got, ref):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert (got[0][target == IGNORE] == 0).all()


# ------------------------------------------------------------------ the model at an index
@pytest.mark.parametrize("decoder,pos_enc,groups", list(itertools.product(HEADS, [False, True], [1, 4])))
def test_decode_at_an_index_equals_the_full_logits_there(decoder, pos_enc, groups):
    torch.manual_seed(0)
    cfg = from_dict({"model": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "decoder": decoder,
                               "point_pos_enc": {"enabled": pos_enc}, "groups": groups}})
    B, S, N = 3, 15, 16
    m = MotionTokenizer(cfg.model, N, 15)
    v = torch.randn(B, S, N, 2) * 0.1
    kw = {"start_pos": torch.rand(B, N, 2) * 128} if pos_enc else {}
    idx = flat_index(torch.rand(B, S, N) < 0.2)
    full = m(v, **kw)["logits"]
    part = m(v, index=idx, **kw)["logits"]
    assert part.shape == (len(idx), 225)
    assert torch.allclose(part, take(full, idx), rtol=1e-5, atol=1e-6)
    params = [p for p in m.parameters()]
    g_full = torch.autograd.grad(take(full, idx).square().mean(), params, allow_unused=True)
    g_part = torch.autograd.grad(part.square().mean(), params, allow_unused=True)
    for a, b in zip(g_full, g_part):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the trainer
def _cfg(decoder: str, filtered: bool, mode: str, **training):
    return from_dict({
        "model": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "decoder": decoder,
                  "point_pos_enc": {"enabled": decoder == "code_query"}},
        "training": {"batch_size": 8, "epochs": 1, "log_interval": 1, "device": "cpu", "decode_points": mode,
                     "learning_rate": 1e-3, **training},
        "data": {"val_split": 0.3, "static_filter": {"enable": filtered}}})


@pytest.mark.parametrize("decoder,filtered", list(itertools.product(HEADS, [False, True])))
def test_one_step_loss_and_gradients_equal_the_full_logits_path(build, tmp_path, decoder, filtered):
    got = {}
    for mode in ("all", "masked"):
        cfg = _cfg(decoder, filtered, mode, **LOSS_SIDE)
        S.seed_everything(0)
        with StopSignals() as stop:
            tr = T.Trainer(cfg, BuildDir(build), tmp_path / mode, D.Dist(), False, False, stop)
        tr.train_loader.set_epoch(0)
        batch = next(iter(tr.train_loader))
        if mode == "masked":
            batch = with_index(batch, "decode_index", "mask", "eval_mask")
            assert len(batch["decode_index"]) < batch["mask"].numel() or not filtered
        torch.manual_seed(1)
        out, loss, info, total, lam, soft = tr.forward_backward(batch, 0.5, True)
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        got[mode] = (float(loss.detach()), float(info["ce"]), float(total.detach()), out["pred"], grads)
    (la, ca, ta, pa, ga), (lm, cm, tm, pm, gm) = got["all"], got["masked"]
    assert lm == pytest.approx(la, rel=1e-5) and cm == pytest.approx(ca, rel=1e-5) and tm == pytest.approx(ta, rel=1e-5)
    sel = with_index(batch, "i", "mask", "eval_mask")["i"]
    assert torch.equal(pm, pa[sel])
    assert ga.keys() == gm.keys()
    for k in ga:
        assert torch.allclose(gm[k], ga[k], rtol=1e-3, atol=1e-6), k


@pytest.mark.parametrize("decoder,filtered", [("additive", False), ("code_query", True), ("amplify", True)])
def test_every_logged_figure_equals_the_full_logits_path(build, tmp_path, decoder, filtered):
    rows = {}
    for mode in ("all", "masked"):
        T.train(_cfg(decoder, filtered, mode, **LOSS_SIDE), build, tmp_path / mode, progress=False)
        rows[mode] = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["all"]) == len(rows["masked"]) >= 4
    compared = 0
    for a, m in zip(rows["all"], rows["masked"]):
        assert a.keys() == m.keys()
        for k, va in a.items():
            if k.startswith("perf/") or not isinstance(va, (int, float)):
                continue
            compared += 1
            assert m[k] == pytest.approx(va, rel=2e-3, abs=1e-4), (k, a.get("step"))
    assert compared > 50
    assert any(k.startswith("val/code_info") for k in rows["masked"][-1])


@pytest.mark.parametrize("decoder", HEADS)
def test_masked_backward_repeats_itself_bit_for_bit(decoder):
    """Gathers whose backward adds repeated rows in a fixed order: a run repeats itself exactly
    (advanced indexing's backward did not on a CPU)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = from_dict({"model": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "decoder": decoder,
                               "point_pos_enc": {"enabled": decoder == "code_query"}}})
    B, S, N = 16, 15, 100
    m = MotionTokenizer(cfg.model, N, 15)
    v = torch.randn(B, S, N, 2) * 0.1
    kw = {"start_pos": torch.rand(B, N, 2) * 128} if decoder == "code_query" else {}
    idx = flat_index(torch.rand(B, S, N) < 0.5)
    target = torch.randint(0, 225, (len(idx),))
    grads = []
    for _ in range(3):
        m.zero_grad()
        ce, _ = linear_ce(m(v, index=idx, features=True, **kw)["features"], m.out_layer, target)
        ce.sum().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], g))


def test_linear_ce_is_float32_under_autocast_as_its_backward_recomputes_it():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 12, generator=g)
    layer = torch.nn.Linear(12, 225)
    target = torch.randint(0, 225, (40,), generator=g)
    ref, _ = linear_ce(x, layer, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = linear_ce(x, layer, target)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5)
