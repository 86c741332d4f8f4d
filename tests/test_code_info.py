"""Code information, CE in bits, AUC and EPE on hand-computable cases (docs/DESIGN.md, Trainer)."""
import math

import numpy as np
import pytest
import torch

from tokenizer_train.evaluate import auc as A
from tokenizer_train.evaluate import code_info as CI
from tokenizer_train.evaluate import metrics as M
from tokenizer_train.evaluate.quality import Quality

K = 9  # a 3x3 window: centre class 4


def _onehot_logits(classes: torch.Tensor, k: int = K, big: float = 60.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, k).float() * big


def test_ce_bits_by_hand():
    # uniform over 4 classes: 2 bits per label; masked entries do not count
    logits = torch.zeros(1, 1, 3, 4)
    labels = torch.tensor([[[0, 3, 1]]])
    mask = torch.tensor([[[True, True, False]]])
    s, n = CI.ce_bits_counts(logits, labels, mask)
    assert n == 2 and s == pytest.approx(4.0)
    # p(label) = 1/2 exactly: 1 bit
    logits = torch.tensor([[[[math.log(2.0), 0.0, 0.0]]]])  # softmax = (1/2, 1/4, 1/4)
    s, n = CI.ce_bits_counts(logits, torch.tensor([[[0]]]), torch.ones(1, 1, 1, dtype=torch.bool))
    assert (s, n) == (pytest.approx(1.0), 1)


def _own_groups(B, m=CI.M_OTHERS):
    return CI.other_clips([f"clip{i}" for i in range(B)], m)


def test_other_clips_are_of_other_groups_fixed_and_as_many_as_there_are():
    groups = [f"rollout{i // 4}" for i in range(40)]  # 10 rollouts of 4 overlapping windows
    o = CI.other_clips(groups, 8, seed=0)
    assert o.shape == (40, 8) and (o >= 0).all()
    for i in range(40):
        assert len(set(o[i])) == 8 and all(groups[j] != groups[i] for j in o[i])
    assert np.array_equal(o, CI.other_clips(groups, 8, seed=0))  # fixed by the seed
    assert not np.array_equal(o, CI.other_clips(groups, 8, seed=1))
    # two groups of 3: each clip has only 3 clips of another group
    o = CI.other_clips(["a", "a", "a", "b", "b", "b"], 8)
    assert ((o >= 0).sum(1) == 3).all()
    assert all(set(o[i][o[i] >= 0]) == ({3, 4, 5} if i < 3 else {0, 1, 2}) for i in range(6))
    assert (CI.other_clips(["a"] * 5, 8) == -1).all()  # one group: nobody to pair with
    # ... unless its windows are far enough apart: one video, windows every 4 frames, 16 long
    o = CI.other_clips(["v"] * 12, 8, starts=np.arange(12) * 4, frames=16)
    for i in range(12):
        got = o[i][o[i] >= 0]
        assert len(got) == sum(abs(j - i) >= 4 for j in range(12)) or len(got) == 8
        assert all(abs(j - i) * 4 >= 16 for j in got)
    assert CI.max_bits() == pytest.approx(math.log2(9)) and CI.max_bits(2) == pytest.approx(math.log2(3))


def _batch(B=12, S=3, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (B, S, N), generator=g)
    mask = torch.rand(B, S, N, generator=g) > 0.2
    return labels, mask


def test_decoder_that_ignores_its_codes_scores_zero():
    labels, mask = _batch()
    fixed = torch.randn(1, 3, 5, K)
    q = torch.randn(12, 3, 4)

    def decode(qz):  # the per-cell prior, whatever the codes
        return fixed.expand(qz.shape[0], -1, -1, -1)

    s, n = CI.code_info_counts(decode, q, q, _own_groups(12), labels, mask)
    assert n == int(mask.sum()) and abs(s / n) < 1e-6


@pytest.mark.parametrize("B", [12, 5])
def test_perfect_deterministic_decoder_scores_log2_m_plus_1(B):
    # clip i's labels are i + (step, point pattern) mod 16: every clip differs from every
    # other at every cell; its codes are its id, and the decoder reads the labels off the
    # codes with certainty: own prediction right, every other clip's wrong
    k = 16
    pattern = torch.arange(3 * 5).reshape(3, 5)
    labels = (torch.arange(B)[:, None, None] + pattern) % k
    q = torch.arange(B).float()[:, None, None].expand(B, 3, 1)

    def decode(qz):
        return _onehot_logits((qz[:, 0, 0].long()[:, None, None] + pattern) % k, k)

    s, n = CI.code_info_counts(decode, q, q, _own_groups(B), labels, torch.ones(B, 3, 5, dtype=torch.bool))
    assert n == B * 15 and s / n == pytest.approx(math.log2(min(8, B - 1) + 1), abs=1e-6)


def test_never_above_log2_m_plus_1_and_confidently_wrong_does_not_inflate():
    labels, mask = _batch(B=16)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(16, 3, 4, generator=g)
        w = torch.randn(4, 5 * K, generator=g) * 20

        def decode(qz):
            return (qz @ w).reshape(qz.shape[0], 3, 5, K)

        s, n = CI.code_info_counts(decode, q, q, _own_groups(16), labels, mask)
        assert s / n <= math.log2(9) + 1e-9
    # a decoder that is sure of a wrong class whatever the codes: own and mixture equally wrong
    wrong = _onehot_logits((labels + 1) % K, big=30.0)
    q = torch.randn(16, 3, 4)
    s, n = CI.code_info_counts(lambda qz: wrong, q, q, _own_groups(16), labels, mask)
    assert abs(s / n) < 1e-6


def test_mixture_by_hand():
    # B=2, one cell: own p(label)=0.5, the other clip's codes give p(label)=0.25;
    # mixture 0.375: info = log2(0.5 / 0.375)
    labels = torch.zeros(2, 1, 1, dtype=torch.long)
    probs = {0: torch.tensor([0.5, 0.5]), 1: torch.tensor([0.25, 0.75])}

    def decode(qz):
        # row r decodes clip r with the codes in row r; clip 0's own codes are id 0
        return torch.stack([probs[int(c)].log() if r == 0 else probs[1 - int(c)].log()
                            for r, c in enumerate(qz[:, 0, 0])])[:, None, None, :]

    q = torch.tensor([0.0, 1.0])[:, None, None]
    s, n = CI.code_info_counts(decode, q, q, _own_groups(2), labels, torch.ones(2, 1, 1, dtype=torch.bool))
    # clip 0: own 0.5, other 0.25 -> log2(0.5/0.375); clip 1: own 0.5 (probs[1-1]), other 0.25: the same
    assert n == 2 and s == pytest.approx(2 * math.log2(0.5 / 0.375))


def _auc_reference(scores, moving):
    pos, neg = scores[moving], scores[~moving]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))


def test_auc_by_hand_and_against_the_rank_reference():
    # p(centre) 0.9, 0.5, 0.2 for labels centre, move, move; and 0.6 for a centre label
    pc = torch.tensor([0.9, 0.5, 0.2, 0.6])
    logits = torch.log(torch.stack([torch.full((K,), (1 - p) / (K - 1)) for p in pc]))
    logits[:, 4] = pc.log()
    labels = torch.tensor([4, 0, 8, 4])
    h = A.auc_hist(logits[None, None], labels[None, None], torch.ones(1, 1, 4, dtype=torch.bool), 4)
    # moving scores 0.5, 0.8 vs static 0.1, 0.4: every pair ordered
    assert A.auc_from_hist(h) == 1.0
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 20, K, generator=g) * 3
    labels = torch.randint(0, K, (4, 6, 20), generator=g)
    mask = torch.rand(4, 6, 20, generator=g) > 0.3
    parts = [A.auc_hist(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1], 4) for i in range(4)]
    score = (1 - torch.softmax(logits, -1)[..., 4])[mask].numpy().astype(np.float64)
    ref = _auc_reference(score, (labels[mask] != 4).numpy())
    assert A.auc_from_hist(sum(parts)) == pytest.approx(ref, abs=2e-3)  # merged batches, near-exact
    assert np.array_equal(sum(parts), A.auc_hist(logits, labels, mask, 4))


def test_auc_separates_a_collapsed_models_tiny_scores():
    # p(centre) within 1e-6 of 1 everywhere, yet ranked: the log-odds bins keep the order
    eps = torch.tensor([1e-7, 2e-7, 4e-7, 8e-7])
    logits = torch.zeros(4, K)
    logits[:, 4] = torch.log((1 - eps) / (eps / (K - 1)))
    labels = torch.tensor([4, 4, 0, 0])
    h = A.auc_hist(logits[None, None], labels[None, None], torch.ones(1, 1, 4, dtype=torch.bool), 4)
    assert A.auc_from_hist(h) == 1.0
    assert math.isnan(A.auc_from_hist(np.zeros((2, A.NBINS))))


def test_epe_zero_by_hand():
    W = 15  # half window 7 px
    v = torch.zeros(1, 1, 3, 2)
    v[0, 0, 0] = torch.tensor([3 / 7, 4 / 7])  # 5 px
    v[0, 0, 1] = torch.tensor([1 / 7, 0.0])  # 1 px, masked out
    mask = torch.tensor([[[True, False, True]]])
    assert M.epe_zero_px_counts(v, mask, W) == (pytest.approx(5.0), 2)


def test_quality_scalars_by_hand():
    # two clips, one cell each: clip 0 label centre predicted centre; clip 1 label 0 predicted centre
    labels = torch.tensor([4, 0])[:, None, None]
    logits = _onehot_logits(torch.tensor([4, 4]))[:, None, None]
    v = torch.zeros(2, 1, 1, 2)
    v[1, 0, 0] = torch.tensor([-1.0, -1.0])  # class 0 of a 3x3 window: (-1, -1) px, half window 1
    q = Quality(3)
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    z = torch.zeros(2, 1, 2)
    q.add(logits, labels, v, mask, info=CI.code_info_counts(lambda _: logits, z, z, _own_groups(2), labels, mask))
    s = q.reduce(torch.device("cpu")).scalars("val", "epoch")
    assert s["val/acc_epoch"] == 0.5 and s["val/acc_noncenter_epoch"] == 0.0
    assert s["val/epe_zero_px_epoch"] == pytest.approx(math.sqrt(2) / 2)
    assert s["val/epe_px_epoch"] == pytest.approx(math.sqrt(2) / 2)
    assert s["val/code_info_bits_epoch"] == pytest.approx(0.0, abs=1e-9)  # codes ignored
    assert s["val/auc_moving_epoch"] == 0.5  # both scores equal: a tie
    assert s["val/ce_bits_epoch"] == pytest.approx(60 / math.log(2) / 2, rel=1e-4)


def test_train_code_info_scores_the_first_m_plus_1_clips_in_eval_mode():
    from tokenizer_train.evaluate.validate import train_code_info

    class Toy(torch.nn.Module):  # logits a fixed function of the codes; records its mode
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 5 * K, generator=torch.Generator().manual_seed(1)) * 5)
            self.modes = []

        def decode(self, qz):
            self.modes.append(self.training)
            return (qz.mean(1) @ self.w).reshape(qz.shape[0], 1, 5, K).expand(-1, 3, -1, -1)

    toy = Toy().train()
    labels, mask = _batch(B=20)
    q = torch.randn(20, 3, 4, generator=torch.Generator().manual_seed(2))
    ids = [f"c{i:02d}" for i in range(20)]
    where = {c: (f"rollout{i // 3}", 0) for i, c in enumerate(ids)}  # windows of a rollout share frames
    got = train_code_info(toy, {"labels": labels, "eval_mask": mask, "clip_id": ids}, q, torch.device("cpu"), where)
    assert toy.training and not any(toy.modes)  # decoded in eval mode, training mode restored
    others = CI.other_clips([where[c][0] for c in ids])[:9]
    assert all(where[ids[j]][0] != where[ids[i]][0] for i in range(9) for j in others[i])
    s, n = CI.code_info_counts(toy.decode, q[:9], q, others, labels[:9], mask[:9])
    assert got == pytest.approx(s / n) and got <= math.log2(9)


def test_validation_code_info_does_not_change_with_batch_size_or_order(tiny_build, monkeypatch):
    """The figure pairs clips by other_clips over the whole split, never by batch neighbours."""
    import contextlib

    from motion_data.build.folder import BuildDir
    from motion_data.read.loader import LoaderOptions, make_loader
    from tokenizer_train.common.config import from_dict
    from tokenizer_train.common.distributed import Dist
    from tokenizer_train.train.losses import Criterion
    from tokenizer_train.model.model import MotionTokenizer
    from tokenizer_train.evaluate import validate as V
    from tokenizer_train.evaluate.validate import Evaluator, clip_places, evaluate

    cfg = from_dict({"model": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2}})
    where = clip_places(BuildDir(tiny_build))
    loader = make_loader(tiny_build, LoaderOptions(batch_size=64), split="train", val_split=0.0)
    loader.set_epoch(0)
    whole = next(iter(loader))
    C = len(whole["clip_id"])
    torch.manual_seed(0)
    model = MotionTokenizer(cfg.model, whole["velocities"].shape[2], 15)

    def batches(order, bs):
        for lo in range(0, C, bs):
            idx = order[lo:lo + bs]
            yield {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in whole.items()}

    def info(order, bs):
        ev = Evaluator(model, Criterion(cfg.training, None, 15), cfg, Dist(), 15, np.zeros(15, np.int64),
                       contextlib.nullcontext, where)
        s, _ = evaluate(ev, list(batches(order, bs)))
        return s["val/code_info_bits_epoch"]

    ref = info(list(range(C)), 8)
    assert ref > 0
    # An untrained model's figure is near zero (about 1e-4 bits), a difference of two CEs of a few
    # bits each: float32 matmuls blocked by batch size move it by ~1e-9 bits, so the tolerance is
    # absolute. The control below shows it is far below what another pairing of clips changes.
    tol = 1e-7
    rng = np.random.default_rng(0)
    for order, bs in ((list(range(C)), 3), (list(rng.permutation(C)), 8), (list(rng.permutation(C)), 17)):
        assert info(order, bs) == pytest.approx(ref, abs=tol)
    monkeypatch.setattr(V, "CODE_INFO_SEED", 1)  # other partners for every clip
    assert abs(info(list(range(C)), 8) - ref) > 100 * tol  # 1.3e-4 bits here
