"""Importers: every format round-trips to reference-pixel velocities; bad input -> DataError naming the file."""
import numpy as np
import pytest

from motion_data.common.errors import DataError
from motion_data.sources.importers import detect_format, iter_sequences, list_inputs, read_sequences

h5py = pytest.importorskip("h5py")
torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)


def _tracks(*lead, N=6, scale=100.0):
    return RNG.uniform(0, scale, size=(*lead, N, 2))


def test_npz_single_sequence_scaled_to_ref(tmp_path):
    tr = _tracks(10)
    p = tmp_path / "a.npz"
    np.savez(p, tracks=tr, image_size=np.array([256, 512]))
    (seq,) = iter_sequences(p, ref_size=128)
    assert seq.source == str(p) and seq.index == 0 and seq.start_frame == 0
    exp = np.diff(tr, axis=0) * np.array([128 / 512, 128 / 256])
    np.testing.assert_allclose(seq.vel, exp, rtol=1e-5, atol=1e-4)
    assert seq.valid.shape == (9, 6) and seq.valid.all()


def test_npz_batched_with_float_visibility_and_start_frame(tmp_path):
    tr = _tracks(3, 8)
    vis = RNG.uniform(0, 1, size=(3, 8, 6))
    p = tmp_path / "b.npz"
    np.savez(p, tracks=tr, visibility=vis, image_size=np.array([128, 128]), start_frame=np.array([0, 4, 8]))
    seqs = list(iter_sequences(p, fmt="tracks"))
    assert [s.index for s in seqs] == [0, 1, 2]
    assert [s.start_frame for s in seqs] == [0, 4, 8]
    for b, s in enumerate(seqs):
        v = vis[b] > 0.5
        np.testing.assert_array_equal(s.valid, v[:-1] & v[1:])
        np.testing.assert_allclose(s.vel, np.diff(tr[b], axis=0), rtol=1e-5, atol=1e-4)


def test_scalar_start_frame_and_bool_visibility(tmp_path):
    tr = _tracks(2, 5)
    vis = RNG.uniform(size=(2, 5, 6)) > 0.3
    p = tmp_path / "c.npz"
    np.savez(p, tracks=tr, visibility=vis, image_size=np.array([64, 64]), start_frame=np.int64(7))
    seqs = read_sequences(p)
    assert [s.start_frame for s in seqs] == [7, 7]
    np.testing.assert_array_equal(seqs[1].valid, vis[1][:-1] & vis[1][1:])
    np.testing.assert_allclose(seqs[0].vel, np.diff(tr[0], axis=0) * 2, rtol=1e-5, atol=1e-4)


def test_npy_needs_image_size_argument(tmp_path):
    tr = _tracks(6)
    p = tmp_path / "d.npy"
    np.save(p, tr)
    with pytest.raises(DataError, match=r"d\.npy.*image.size"):
        list(iter_sequences(p))
    (seq,) = iter_sequences(p, image_size=(64, 32))
    np.testing.assert_allclose(seq.vel, np.diff(tr, axis=0) * np.array([4, 2]), rtol=1e-5, atol=1e-4)


def test_pt_dict_and_bare_tensor(tmp_path):
    tr = _tracks(2, 7)
    p = tmp_path / "e.pt"
    torch.save({"tracks": torch.tensor(tr), "visibility": torch.ones(2, 7, 6), "image_size": torch.tensor([128, 128]),
                "start_frame": torch.tensor([3, 9])}, p)
    assert detect_format(p) == "tracks"
    seqs = list(iter_sequences(p))
    assert [s.start_frame for s in seqs] == [3, 9]
    np.testing.assert_allclose(seqs[1].vel, np.diff(tr[1], axis=0), rtol=1e-5, atol=1e-4)
    q = tmp_path / "bare.pt"
    torch.save(torch.tensor(tr), q)
    assert detect_format(q) == "tracks"
    assert len(list(iter_sequences(q, image_size=(128, 128)))) == 2


def test_laps_pt_scale(tmp_path):
    v = RNG.uniform(-1, 1, size=(15, 6, 2)).astype(np.float32)
    d = tmp_path / "laps"
    (d / "sub").mkdir(parents=True)
    for i in range(2):
        torch.save(torch.tensor(v * (i + 1) / 2), d / "sub" / f"clip{i}.pt")
    files = list_inputs([d])
    assert [f.rsplit("/", 1)[1] for f in files] == ["clip0.pt", "clip1.pt"]
    assert detect_format(files[1]) == "laps-pt"
    (seq,) = iter_sequences(files[1])
    # positions are float32 around the frame centre, so velocities carry ~1e-5 px of rounding
    np.testing.assert_allclose(seq.vel, v * 7.0, rtol=1e-6, atol=2e-5)
    assert (seq.pos[0] == 64.0).all()  # the documented origin: the frame centre
    assert seq.valid.all() and seq.valid.shape == (15, 6)
    # forced format on a file with out-of-range values is refused
    torch.save(torch.tensor(v * 3), d / "bad.pt")
    with pytest.raises(DataError, match=r"bad\.pt.*\[-1, 1\]"):
        list(iter_sequences(d / "bad.pt", fmt="laps-pt"))


def _amplify(path, views=("agentview", "eye_in_hand"), n=4, N=5):
    data = {}
    with h5py.File(path, "w") as f:
        for v in views:
            tr = RNG.uniform(2, 126, size=(n, 16, N, 2))
            vis = RNG.uniform(size=(n, 16, N)) > 0.2
            f.create_dataset(f"root/{v}/tracks", data=tr)
            f.create_dataset(f"root/{v}/vis", data=vis)
            data[v] = (tr, vis)
    return data


def test_amplify_h5_views_and_ref_size(tmp_path):
    p = tmp_path / "demo.hdf5"
    data = _amplify(p)
    assert detect_format(p) == "amplify-h5"
    seqs = list(iter_sequences(p, ref_size=64))
    assert len(seqs) == 8 and [s.index for s in seqs] == list(range(8))
    assert [s.start_frame for s in seqs[:4]] == [0, 1, 2, 3]
    tr, vis = data["eye_in_hand"]  # views in sorted order: agentview first
    np.testing.assert_allclose(seqs[5].vel, np.diff(tr[1], axis=0) / 2, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(seqs[5].valid, vis[1][:-1] & vis[1][1:])
    only = list(iter_sequences(p, views=["eye_in_hand"]))
    assert len(only) == 4
    np.testing.assert_allclose(only[1].vel, np.diff(tr[1], axis=0), rtol=1e-5, atol=1e-4)
    with pytest.raises(DataError, match=r"demo\.hdf5.*wrist"):
        list(iter_sequences(p, views=["wrist"]))


def test_atm_h5_normalised_with_video_size(tmp_path):
    p = tmp_path / "atm.h5"
    tr = RNG.uniform(0, 1, size=(1, 12, 5, 2))
    vis = RNG.uniform(size=(1, 12, 5))
    with h5py.File(p, "w") as f:
        f.create_dataset("root/agentview/tracks", data=tr)
        f.create_dataset("root/agentview/vis", data=vis)
        f.create_dataset("root/agentview/video", data=np.zeros((1, 12, 3, 64, 32), np.uint8))
    assert detect_format(p) == "atm-h5"
    (seq,) = iter_sequences(p)
    # normalised x * W(32) px, rescaled to 128: x * 128 for both axes
    np.testing.assert_allclose(seq.vel, np.diff(tr[0], axis=0) * 128, rtol=1e-5, atol=1e-4)
    v = vis[0] > 0.5
    np.testing.assert_array_equal(seq.valid, v[:-1] & v[1:])


def test_amplify_h5_visibility_key_and_top_level_views(tmp_path):
    p = tmp_path / "flat.h5"
    tr = RNG.uniform(2, 126, size=(3, 16, 5, 2))
    vis = np.zeros((3, 16, 5), np.float32)
    vis[:, :, :2] = 1.0
    with h5py.File(p, "w") as f:
        f.create_dataset("agentview/tracks", data=tr)
        f.create_dataset("agentview/visibility", data=vis)
    seqs = list(iter_sequences(p))
    assert len(seqs) == 3
    assert seqs[2].valid[:, :2].all() and not seqs[2].valid[:, 2:].any()


def test_atm_h5_without_video_needs_image_size(tmp_path):
    p = tmp_path / "atm2.h5"
    tr = RNG.uniform(0, 1, size=(1, 6, 4, 2))
    with h5py.File(p, "w") as f:
        f.create_dataset("agentview/tracks", data=tr)
    with pytest.raises(DataError, match=r"atm2\.h5.*image.size"):
        list(iter_sequences(p, fmt="atm-h5"))
    (seq,) = iter_sequences(p, fmt="atm-h5", image_size=(100, 100))
    np.testing.assert_allclose(seq.vel, np.diff(tr[0], axis=0) * 128, rtol=1e-5, atol=1e-4)


def test_list_inputs(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ["x/b.npz", "x/y/a.h5", "x/notes.txt", "c.npy"]:
        (tmp_path / name).write_bytes(b"1")
    got = list_inputs([tmp_path / "x", tmp_path / "c.npy", tmp_path / "x"])
    assert got == sorted({str(tmp_path / "x/b.npz"), str(tmp_path / "x/y/a.h5"), str(tmp_path / "c.npy")})
    with pytest.raises(DataError, match="missing"):
        list_inputs([tmp_path / "missing"])


# ------------------------------------------------------------------ bad input


def _bad_cases(tmp_path):
    good = dict(tracks=_tracks(5), image_size=np.array([64, 64]))

    def npz(name, **kw):
        p = tmp_path / name
        np.savez(p, **{**good, **kw})
        return p

    cases = {}
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    cases["empty"] = p
    full = npz("full.npz").read_bytes()
    p = tmp_path / "trunc.npz"
    p.write_bytes(full[: len(full) // 2])
    cases["truncated"] = p
    t = _tracks(5)
    t[2, 3, 0] = np.nan
    cases["nan"] = npz("nan.npz", tracks=t)
    t = _tracks(5)
    t[1, 1, 1] = np.inf
    cases["inf"] = npz("inf.npz", tracks=t)
    cases["rank"] = npz("rank.npz", tracks=RNG.uniform(size=(5, 6)))
    cases["coords"] = npz("coords.npz", tracks=RNG.uniform(size=(5, 6, 3)))
    cases["zero_points"] = npz("zero.npz", tracks=np.zeros((5, 0, 2)))
    cases["one_frame"] = npz("oneframe.npz", tracks=_tracks(1))
    p = tmp_path / "nokey.npz"
    np.savez(p, points=_tracks(5), image_size=np.array([64, 64]))
    cases["missing_key"] = p
    p = tmp_path / "nosize.npz"
    np.savez(p, tracks=_tracks(5))
    cases["missing_size"] = p
    cases["bad_size"] = npz("badsize.npz", image_size=np.array([0, 64]))
    cases["vis_shape"] = npz("visshape.npz", visibility=np.ones((5, 7)))
    cases["start_shape"] = npz("startshape.npz", start_frame=np.array([1, 2]))
    p = tmp_path / "objarr.npz"
    np.savez(p, tracks=np.array([None, 1], dtype=object), image_size=np.array([64, 64]))
    cases["pickled_npz"] = p
    p = tmp_path / "pickled.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["pickled_npy"] = p
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"not a torch file at all")
    cases["bad_pt"] = p
    p = tmp_path / "pickle.pt"
    torch.save({"tracks": torch.zeros(3, 2, 2), "obj": _Evil()}, p)
    cases["pt_object"] = p
    p = tmp_path / "trunc.pt"
    torch.save({"tracks": torch.zeros(3, 4, 2)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    p.write_bytes(whole[: len(whole) // 2])
    cases["truncated_pt"] = p
    p = tmp_path / "trunc.h5"
    _amplify(tmp_path / "full.h5")
    full = (tmp_path / "full.h5").read_bytes()
    p.write_bytes(full[: len(full) // 3])
    cases["truncated_h5"] = p
    p = tmp_path / "novis.h5"
    with h5py.File(p, "w") as f:
        f.create_group("root/agentview").create_dataset("points", data=np.zeros(3))
    cases["h5_no_tracks"] = p
    p = tmp_path / "rank3.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("root/agentview/tracks", data=RNG.uniform(2, 100, size=(16, 5, 2)))
    cases["h5_rank"] = p
    cases["h5_rank_forced"] = p
    p = tmp_path / "nan.hdf5"
    tr = RNG.uniform(2, 126, size=(3, 16, 5, 2))
    tr[1, 4, 2, 1] = np.nan
    with h5py.File(p, "w") as f:
        f.create_dataset("root/agentview/tracks", data=tr)
    cases["h5_nan"] = p
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    cases["unknown_ext"] = p
    return cases


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_every_bad_input_raises_input_error_naming_the_file(tmp_path, capsys):
    for name, path in _bad_cases(tmp_path).items():
        fmt = "amplify-h5" if name in ("h5_nan", "h5_rank_forced") else "auto"
        with pytest.raises(DataError) as ei:
            list(iter_sequences(path, fmt=fmt))
        msg = str(ei.value)
        assert msg.startswith(str(path)), (name, msg)
        assert "\n" not in msg, (name, msg)
    assert "unpickled!" not in capsys.readouterr().out


def test_pickled_pt_refused_without_running_code(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"tracks": torch.zeros(3, 2, 2), "obj": _Evil()}, p)
    with pytest.raises(DataError, match=r"evil\.pt: .*pickled object"):
        list(iter_sequences(p, image_size=(8, 8)))
    assert "unpickled!" not in capsys.readouterr().out


def test_pickled_npy_message(tmp_path):
    p = tmp_path / "pickled.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"pickled\.npy: .*pickled"):
        list(iter_sequences(p, image_size=(64, 64)))


def test_bad_file_yields_nothing(tmp_path):
    tr = _tracks(3, 5)
    tr[2, 1, 0, 0] = np.nan  # only the last sequence is bad
    p = tmp_path / "late.npz"
    np.savez(p, tracks=tr, image_size=np.array([64, 64]))
    it = iter_sequences(p)
    with pytest.raises(DataError, match=r"late\.npz"):
        next(it)


def test_nan_on_invisible_points_is_allowed(tmp_path):
    tr = _tracks(5)
    vis = np.ones((5, 6), bool)
    tr[2, 3] = np.nan
    vis[2, 3] = False
    p = tmp_path / "occl.npz"
    np.savez(p, tracks=tr, visibility=vis, image_size=np.array([128, 128]))
    (seq,) = iter_sequences(p)
    assert not seq.valid[1, 3] and not seq.valid[2, 3] and seq.valid[3, 3]
    assert np.isfinite(seq.vel).all()


def test_cotracker_key_names(tmp_path):
    """CoTracker's own output keys (pred_tracks, pred_visibility) read like ours."""
    tr = RNG.uniform(0, 100, size=(2, 6, 5, 2)).astype(np.float32)
    vis = RNG.random((2, 6, 5)) > 0.3
    p = tmp_path / "cot.npz"
    np.savez(p, pred_tracks=tr, pred_visibility=vis, image_size=np.array([100, 100]))
    q = tmp_path / "ours.npz"
    np.savez(q, tracks=tr, visibility=vis, image_size=np.array([100, 100]))
    a, b = read_sequences(p), read_sequences(q)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pos, y.pos)
        np.testing.assert_array_equal(x.vis, y.vis)
    np.testing.assert_allclose(a[1].pos, tr[1] * 1.28, rtol=1e-6)
    torch.save({"pred_tracks": torch.from_numpy(tr), "pred_visibility": torch.from_numpy(vis),
                "image_size": torch.tensor([100, 100])}, tmp_path / "cot.pt")
    assert detect_format(tmp_path / "cot.pt") == "tracks"
    np.testing.assert_array_equal(read_sequences(tmp_path / "cot.pt")[0].pos, a[0].pos)


def test_batched_file_without_start_frame_is_independent_sequences(tmp_path):
    """docs/DESIGN.md: (B,T,N,2) without start_frame = B independent sequences, each its own
    split group; with start_frame = windows of one video, one group (the file)."""
    tr = RNG.uniform(0, 100, size=(3, 6, 5, 2)).astype(np.float32)
    np.savez(tmp_path / "indep.npz", tracks=tr, image_size=np.array([100, 100]))
    np.savez(tmp_path / "windows.npz", tracks=tr, image_size=np.array([100, 100]), start_frame=np.array([0, 2, 4]))
    np.savez(tmp_path / "single.npz", tracks=tr[0], image_size=np.array([100, 100]))
    indep = read_sequences(tmp_path / "indep.npz")
    assert [s.group for s in indep] == [f"{tmp_path / 'indep.npz'}#{b}" for b in range(3)]
    assert {s.group for s in read_sequences(tmp_path / "windows.npz")} == {str(tmp_path / "windows.npz")}
    assert [s.group for s in read_sequences(tmp_path / "single.npz")] == [str(tmp_path / "single.npz")]
