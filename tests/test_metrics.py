"""Metric functions against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from motion_data.common.labels import center_class
from tokenizer_train.evaluate import metrics as M


def test_code_stats_hand_computed():
    codes = np.array([[0, 0], [1, 3]])
    s = M.code_stats(codes, [2, 2])
    assert s["counts"].tolist() == [2, 1, 0, 1]
    assert s["unique_codes"] == 3
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    assert s["entropy"] == pytest.approx(1.5 * math.log(2))
    assert s["entropy_norm"] == pytest.approx(0.75)
    assert s["perplexity"] == pytest.approx(2 ** 1.5)
    # codes 0->(0,0), 1->(1,0), 3->(1,1): 2 levels on each channel
    assert s["unique_codes_raw"] == 4


def test_collapsed_codes():
    s = M.code_stats(np.full(50, 7), [8, 8, 6, 5])
    assert s["unique_codes"] == 1 and s["entropy"] == 0.0 and s["perplexity"] == 1.0
    assert s["unique_codes_raw"] == 4  # one level per channel
    assert s["counts"].shape == (1920,)


def test_unique_raw_mixed_radix():
    # levels [3,4]: id = l0 + 3*l1; ids 0,1,5 -> (0,0),(1,0),(2,1)
    assert M.level_indices(np.array([0, 1, 5]), [3, 4]).tolist() == [[0, 0], [1, 0], [2, 1]]
    assert M.unique_raw_levels([0, 1, 5], [3, 4]) == 3 + 2
    assert M.unique_raw_levels([0, 3, 6], [3, 4]) == 1 + 3


def test_code_counts_rejects_out_of_range():
    with pytest.raises(ValueError):
        M.code_counts([0, 4], 4)


def test_seen_counts_distinct_not_max_id():
    seen = np.zeros(10, bool)
    assert M.update_seen(seen, [9, 9]) == 1
    assert M.update_seen(seen, [0, 9, 3]) == 3


def test_zero_code_frac_per_step():
    codes = np.array([[5, 6, 7], [5, 1, 7]])
    assert M.zero_code_frac(codes, np.array([5, 6, 0])) == pytest.approx(3 / 6)


def _onehot_logits(pred, K, big=50.0):
    return torch.nn.functional.one_hot(torch.as_tensor(pred), K).float() * big


def test_accuracy_and_noncenter():
    W = 3
    c = center_class(W)  # 4
    labels = torch.tensor([[[4, 4, 0, 8]]])
    pred = torch.tensor([[[4, 1, 0, 4]]])
    mask = torch.tensor([[[True, True, True, False]]])
    logits = _onehot_logits(pred, 9)
    assert M.accuracy_counts(logits, labels, mask) == (2.0, 3)
    # non-centre kept labels: only the 0 -> predicted 0
    assert M.noncenter_counts(logits, labels, mask, c) == (1.0, 1)
    assert M.ratio((2.0, 3)) == pytest.approx(2 / 3)
    assert M.ratio((0.0, 0)) == 0.0


def test_epe_px():
    W = 3  # half window 1 px
    # class 5 = row 1, col 2 -> (+1, 0) px; class 1 = row 0 col 1 -> (0, -1)
    logits = torch.full((1, 1, 2, 9), -1e4)
    logits[0, 0, 0, 5] = 0.0
    logits[0, 0, 1, 1] = 0.0
    logits[0, 0, 1, 7] = 0.0  # (0, +1): expectation of point 1 is (0, 0)
    vel = torch.tensor([[[[1.0, 0.0], [0.6, 0.8]]]])  # px: (1,0) and (0.6, 0.8)
    s, n = M.epe_px_counts(logits, vel, torch.ones(1, 1, 2, dtype=torch.bool), W)
    assert n == 2
    assert s == pytest.approx(0.0 + 1.0, abs=1e-5)
    s, n = M.epe_px_counts(logits, vel, torch.tensor([[[True, False]]]), W)
    assert (s, n) == (pytest.approx(0.0, abs=1e-5), 1)


def test_dynamic_point_counts():
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[0, 2, 2] = True
    mask[1, 0, 0] = True
    assert M.dynamic_point_counts(mask) == (2, 8)


def test_accuracy_accepts_predicted_ids():
    labels = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert M.accuracy_counts(torch.tensor([[1, 0, 3]]), labels, mask) == (2.0, 3)


def test_boundary_counts_by_hand():
    # FSQ rounds the bounded values at half-integers: 0.45 and -1.55 are within 0.1 of one,
    # 0.0, 2.9 and -0.62 are not (distance 0.5, 0.4, 0.12)
    z = torch.tensor([[0.45, 0.0, 2.9], [-1.55, -0.62, 0.0]])
    assert M.boundary_counts(z) == (2.0, 6)
    assert M.boundary_counts(z, margin=0.13) == (3.0, 6)
