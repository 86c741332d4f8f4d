"""track-video: LK grid tracking recovers known motion; real vtest.avi when installed."""
import numpy as np
import pytest

from motion_data.common.errors import DataError
from motion_data.sources.importers import iter_sequences
from motion_data.common.labels import step_valid, velocities
from motion_data.sources.synth import clips_from_sequences
from synth_figures import label_summary
from motion_data.sources.video import TrackConfig, find_sample_video, grid_points, track_video
from preprocess.__main__ import main

cv2 = pytest.importorskip("cv2")

VTEST = find_sample_video()
SHIFT = np.array([2.0, 1.0])  # square's motion, px per frame (x, y)


def _texture(rng, h, w):
    t = rng.uniform(0, 255, size=(h, w)).astype(np.float32)
    return cv2.GaussianBlur(t, (0, 0), 1.5)


@pytest.fixture(scope="module")
def square_video(tmp_path_factory):
    """24 frames of 128x96: static textured background, a textured 32x32 square moving (+2, +1) px/frame."""
    rng = np.random.default_rng(0)
    H, W, n = 96, 128, 24
    bg = _texture(rng, H, W)
    sq = _texture(rng, 32, 32) * 0.5 + 127
    path = tmp_path_factory.mktemp("vid") / "square.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert w.isOpened()
    for f in range(n):
        img = bg.copy()
        x, y = (np.array([20.0, 20.0]) + SHIFT * f).astype(int)
        img[y:y + 32, x:x + 32] = sq
        w.write(cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    w.release()
    return path


def test_grid_points_cover_frame():
    q = grid_points(60, 100, 4)
    assert q.shape == (16, 2)
    np.testing.assert_allclose(q[:4, 0], [12.5, 37.5, 62.5, 87.5])
    np.testing.assert_allclose(q[::4, 1], [7.5, 22.5, 37.5, 52.5])


def test_lk_recovers_square_motion(square_video):
    d = track_video(square_video, TrackConfig(window=8, stride=4, grid=16))
    tr, vis = d["tracks"], d["visibility"]
    assert tr.shape == (5, 8, 256, 2) and vis.shape == (5, 8, 256)  # starts 0,4,8,12,16 end by frame 23
    np.testing.assert_array_equal(d["start_frame"], [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(d["image_size"], [96, 128])
    q = grid_points(96, 128, 16)
    for b, s in enumerate(d["start_frame"]):
        corner = np.array([20.0, 20.0]) + SHIFT * s
        rel = q - corner
        on_square = ((rel > 6) & (rel < 26)).all(1)      # well inside the square
        # clear (by 14 px, beyond LK's half window) of the square's whole path in the window
        far = ~((rel > -14) & (rel - SHIFT * 7 < 46)).all(1)
        v = np.diff(tr[b], axis=0)
        ok = vis[b, 1:] & vis[b, :-1]
        assert on_square.sum() >= 4 and far.sum() >= 50
        mv = v[:, on_square][ok[:, on_square]]
        np.testing.assert_allclose(np.median(mv, axis=0), SHIFT, atol=0.25)
        st = v[:, far][ok[:, far]]
        assert np.abs(np.median(st, axis=0)).max() < 0.1
        assert ok[:, far].mean() > 0.9


def test_track_video_command_and_importer(square_video, tmp_path):
    out = tmp_path / "tracks"
    rc = main(["track-video", str(square_video), "--out", str(out), "--window", "8", "--stride", "8",
               "--grid", "10", "--no-progress"])
    assert rc == 0
    seqs = list(iter_sequences(out / "square.npz", ref_size=128))
    assert [s.start_frame for s in seqs] == [0, 8, 16]
    assert seqs[0].vel.shape == (7, 100, 2)
    # pixel -> reference px: x scaled by 128/128, y by 128/96
    moving = np.abs(np.concatenate([s.vel for s in seqs])).max(axis=(0, 2)) > 1.5
    assert 0 < moving.sum() < 50


def test_bad_videos(tmp_path, square_video, capsys):
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"this is not a video")
    with pytest.raises(DataError, match=r"junk\.avi"):
        track_video(junk)
    with pytest.raises(DataError, match=r"square\.avi.*shorter than one window"):
        track_video(square_video, TrackConfig(window=30))
    with pytest.raises(DataError, match=r"missing\.avi"):
        track_video(tmp_path / "missing.avi")
    out = tmp_path / "o"
    assert main(["track-video", str(junk), "--out", str(out), "--no-progress"]) == 2
    assert "junk.avi" in capsys.readouterr().err
    rc = main(["track-video", str(junk), str(square_video), "--out", str(out), "--window", "8",
               "--on-error", "skip", "--no-progress"])
    assert rc == 0 and (out / "square.npz").exists() and not (out / "junk.npz").exists()
    assert "skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_frames"):
        TrackConfig(window=16, max_frames=10)


@pytest.mark.skipif(VTEST is None, reason="OpenCV sample video vtest.avi not installed (Debian package opencv-doc)")
def test_vtest_first_frames(tmp_path):
    d = track_video(VTEST, TrackConfig(max_frames=40))
    assert d["tracks"].shape == (4, 16, 400, 2)
    np.testing.assert_array_equal(d["start_frame"], [0, 8, 16, 24])
    np.testing.assert_array_equal(d["image_size"], [576, 768])
    assert d["visibility"].mean() > 0.8
    p = tmp_path / "vtest.npz"
    np.savez(p, **d)
    pos, vis = clips_from_sequences(list(iter_sequences(p)), window=16, stride=8)
    r = label_summary(pos, vis)
    vel, valid = velocities(pos), step_valid(vis)
    # static camera, a few walking people: mostly centre labels, a moving minority
    assert r["center_before"] > 0.9
    assert r["center_after"] < r["center_before"]
    speed = np.linalg.norm(vel, axis=-1)[valid]
    assert np.median(speed) < 0.1 and (speed > 0.5).sum() > 100
