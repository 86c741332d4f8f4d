import numpy as np
import pytest

from motion_data.augment import AugmentConfig, augment_batch
from motion_data.labels import center_class, labels_from_norm, normalize
from motion_data.loader import make_batch
from motion_data.stats import StaticFilter


def _batch(B=32, S=15, N=40, seed=0):
    rng = np.random.default_rng(seed)
    v = normalize(rng.normal(0, 1.5, (B, S, N, 2)).astype(np.float32))
    keep = rng.random((B, N)) < 0.6
    v *= np.where(keep, 1.0, 0.02)[:, None, :, None].astype(np.float32)  # dropped points barely move
    v[:, :, :3] = 0.0  # exactly still points
    valid = rng.random((B, S, N)) < 0.9
    return v, keep, valid


def test_off_by_default_is_identity():
    v, keep, valid = _batch()
    assert not AugmentConfig().enabled
    assert augment_batch(v, keep, valid, AugmentConfig(), np.random.default_rng(0)) is v


def test_jitter_is_zero_mean_and_only_on_moving_kept_points():
    v, keep, valid = _batch(B=64)
    v = np.clip(v, -0.5, 0.5)  # keep clear of the clip at +-1 so the noise is seen whole
    cfg = AugmentConfig(enabled=True, scale_range=[1.0, 1.0], jitter_std=0.05, p=1.0)
    out = augment_batch(v, keep, valid, cfg, np.random.default_rng(1))
    d = out - v
    moving = (v != 0).any(-1) & valid & keep[:, None, :]
    noise = d[moving]
    assert noise.size > 10000
    assert abs(noise.mean()) < 4 * 0.05 / np.sqrt(noise.size)
    assert abs(noise.std() - 0.05) < 0.005
    assert (d[~moving] == 0).all()


def test_scaling_keeps_static_points_centre_and_stays_in_range():
    v, keep, valid = _batch()
    cfg = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.02, p=1.0)
    out = augment_batch(v, keep, valid, cfg, np.random.default_rng(2))
    c = center_class()
    lab_before, lab_after = labels_from_norm(v), labels_from_norm(out)
    static = ~keep[:, None, :] | (v == 0).all(-1)
    was_centre = lab_before == c
    assert (lab_after[static & was_centre] == c).all()
    assert np.abs(out).max() <= 1.0
    # kept points: one scale per clip within the range
    cfg0 = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.0, p=1.0)
    out0 = augment_batch(v, keep, valid, cfg0, np.random.default_rng(3))
    kept_moving = keep[:, None, :] & (np.abs(v[..., 0]) > 0.05) & (np.abs(out0[..., 0]) < 1)
    ratio0 = out0[..., 0] / np.where(v[..., 0] == 0, np.nan, v[..., 0])
    scales = []
    for b in range(v.shape[0]):
        r = ratio0[b][kept_moving[b]]
        assert r.max() - r.min() < 1e-5
        scales.append(r.mean())
    assert 0.5 - 1e-6 <= min(scales) and max(scales) <= 2.0 + 1e-6 and np.std(scales) > 0.1


def test_p_zero_changes_nothing():
    v, keep, valid = _batch()
    cfg = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.1, p=0.0)
    np.testing.assert_array_equal(augment_batch(v, keep, valid, cfg, np.random.default_rng(0)), v)


def test_batch_labels_agree_with_augmented_inputs():
    rng = np.random.default_rng(4)
    vel = rng.normal(0, 3, (8, 15, 30, 2)).astype(np.float32)
    valid = rng.random((8, 15, 30)) < 0.9
    stats = rng.random((8, 3, 30)).astype(np.float32) * 0.1
    cfg = AugmentConfig(enabled=True, scale_range=[0.7, 1.4], jitter_std=0.05, p=1.0)
    b = make_batch(vel, valid, stats, [str(i) for i in range(8)], StaticFilter(enable=True, min_keep=4), 15, cfg,
                   np.random.default_rng(0))
    v = b["velocities"].numpy()
    assert (b["labels"].numpy() == labels_from_norm(v)).all()
    assert not np.allclose(v, normalize(vel))  # it did augment


def test_bad_config():
    with pytest.raises(ValueError):
        AugmentConfig(scale_range=[0, 1])
    with pytest.raises(ValueError):
        AugmentConfig(p=2)
