import numpy as np
import pytest

from motion_data.read.augment import AugmentConfig, augment_batch
from motion_data.common.labels import center_class, half_window, labels_from_positions, normalize, velocities
from motion_data.read.batch import BatchRecipe, make_batch
from motion_data.common.static_filter import StaticFilter


def _batch(B=32, T=16, N=40, seed=0):
    """Positions (B, T, N, 2): kept points move, dropped ones barely, points 0-2 never."""
    rng = np.random.default_rng(seed)
    keep = rng.random((B, N)) < 0.6
    vel = rng.normal(0, 1.5, (B, T - 1, N, 2)) * np.where(keep, 1.0, 0.02)[:, None, :, None]
    vel[:, :, :3] = 0.0  # exactly still points
    start = rng.uniform(30, 98, (B, 1, N, 2))
    pos = np.concatenate([start, start + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    return pos, keep


def test_off_by_default_is_identity():
    pos, keep = _batch()
    assert not AugmentConfig().enabled
    assert augment_batch(pos, keep, AugmentConfig(), np.random.default_rng(0)) is pos


def test_jitter_is_zero_mean_and_only_on_moving_kept_points():
    pos, keep = _batch(B=64)
    cfg = AugmentConfig(enabled=True, scale_range=[1.0, 1.0], jitter_std=0.05, p=1.0)
    out = augment_batch(pos, keep, cfg, np.random.default_rng(1))
    d = out - pos
    moving = (pos != pos[:, :1]).any(axis=(1, 3)) & keep  # (B, N)
    noise = d[:, 1:][np.broadcast_to(moving[:, None], d.shape[:3])[:, 1:]]
    px = 0.05 * half_window()  # jitter_std is in normalised units
    assert noise.size > 10000
    assert abs(noise.mean()) < 4 * px / np.sqrt(noise.size)
    assert abs(noise.std() - px) < 0.1 * px
    assert (d[:, 0] == 0).all()  # the first frame is the anchor
    assert (d[~np.broadcast_to(moving[:, None], d.shape[:3])] == 0).all()


def test_scaling_is_about_the_first_position_and_keeps_static_points_centre():
    pos, keep = _batch()
    cfg = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.02, p=1.0)
    out = augment_batch(pos, keep, cfg, np.random.default_rng(2))
    c = center_class()
    for rule in ("amplify", "velocity"):
        lab_before, lab_after = labels_from_positions(pos, rule=rule), labels_from_positions(out, rule=rule)
        static = ~keep[:, None, :] | (velocities(pos) == 0).all(-1)
        was_centre = lab_before == c
        assert (lab_after[static & was_centre] == c).all()
    # kept points: p'[t] = p[0] + s * (p[t] - p[0]), one s per clip within the range
    cfg0 = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.0, p=1.0)
    out0 = augment_batch(pos, keep, cfg0, np.random.default_rng(3))
    np.testing.assert_array_equal(out0[:, 0], pos[:, 0])
    disp, disp0 = pos - pos[:, :1], out0 - out0[:, :1]
    scales = []
    for b in range(pos.shape[0]):
        sel = keep[b][None, :, None] & (np.abs(disp[b]) > 0.5)
        r = disp0[b][sel] / disp[b][sel]
        assert r.max() - r.min() < 1e-4
        scales.append(r.mean())
        np.testing.assert_array_equal(out0[b][:, ~keep[b]], pos[b][:, ~keep[b]])  # dropped points untouched
    assert 0.5 - 1e-6 <= min(scales) and max(scales) <= 2.0 + 1e-6 and np.std(scales) > 0.1


def test_p_zero_changes_nothing():
    pos, keep = _batch()
    cfg = AugmentConfig(enabled=True, scale_range=[0.5, 2.0], jitter_std=0.1, p=0.0)
    np.testing.assert_array_equal(augment_batch(pos, keep, cfg, np.random.default_rng(0)), pos)


@pytest.mark.parametrize("rule", ["amplify", "velocity"])
def test_batch_labels_agree_with_augmented_inputs(rule):
    rng = np.random.default_rng(4)
    vel = rng.normal(0, 3, (8, 15, 30, 2))
    pos = np.concatenate([np.full((8, 1, 30, 2), 64.0), 64.0 + np.cumsum(vel, axis=1)], axis=1).astype(np.float32)
    vis = rng.random((8, 16, 30)) < 0.95
    stats = rng.random((8, 3, 30)).astype(np.float32) * 0.1
    cfg = AugmentConfig(enabled=True, scale_range=[0.7, 1.4], jitter_std=0.05, p=1.0)
    recipe = BatchRecipe(StaticFilter(enable=True, min_keep=4), 15, cfg, label_rule=rule)
    b = make_batch(pos, vis, stats, [str(i) for i in range(8)], recipe, np.random.default_rng(0))
    p, v = b["positions"].numpy(), b["velocities"].numpy()
    np.testing.assert_array_equal(v, normalize(velocities(p)))
    assert (b["labels"].numpy() == labels_from_positions(p, 15, 128, rule)).all()
    assert not np.allclose(p, pos)  # it did augment
    np.testing.assert_array_equal(p[:, 0], pos[:, 0])
