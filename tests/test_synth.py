"""Synthetic tracks: label statistics in the real range, deterministic, plausible scene."""
import json

import numpy as np
import pytest

from motion_data.sources.importers import iter_sequences, list_inputs
from motion_data.sources.synth import SynthConfig, clips_from_sequences, synth_clips, write_synth
from synth_figures import label_summary
from preprocess.__main__ import main


def _summary_of_files(paths):
    seqs = [s for p in paths for s in iter_sequences(p, ref_size=128)]
    pos, vis = clips_from_sequences(seqs, window=16, stride=8)
    return label_summary(pos, vis, "p95", 0.04, 16), pos.shape


def test_default_label_statistics_in_real_range(tmp_path):
    paths = write_synth(tmp_path, 120, seed=3, clips_per_file=60)
    r, shape = _summary_of_files(paths)
    assert shape == (120, 16, 400, 2)
    assert 0.85 <= r["center_before"] <= 0.97, r
    assert 0.50 <= r["center_after"] <= 0.70, r
    # the filter does real work: it drops most points but keeps more than min_keep per clip
    assert 16 / 400 < r["dynamic_point_ratio"] < 0.5, r


def test_deterministic_given_seed():
    a = synth_clips(6, 11)
    b = synth_clips(6, 11)
    c = synth_clips(6, 12)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tracks"], c["tracks"])


def test_files_independent_of_file_count(tmp_path):
    p1 = write_synth(tmp_path / "a", 10, seed=5, clips_per_file=5)
    p2 = write_synth(tmp_path / "b", 5, seed=5, clips_per_file=5)
    with np.load(p1[0]) as x, np.load(p2[0]) as y:
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])
    with np.load(p1[1]) as x:
        np.testing.assert_array_equal(x["start_frame"], np.arange(5, 10) * 16)


def test_scene_layers_behave():
    d = synth_clips(40, 0, with_layers=True)
    tr, vis, layer = d["tracks"], d["visibility"], d["layer"]
    assert tr.shape == (40, 16, 400, 2) and vis.shape == (40, 16, 400) and tr.dtype == np.float32
    step = np.linalg.norm(np.diff(tr, axis=1), axis=-1) * 128 / 256  # reference px
    valid = vis[:, 1:] & vis[:, :-1]
    bg = (layer == 0)[:, None, :] & valid
    movers = (layer > 0)[:, None, :] & valid
    assert np.median(step[bg]) < 0.15          # background: tracker noise only
    assert np.mean(step[movers] > 0.5) > 0.4   # movers mostly move a label or more
    assert (layer == 4).any() and ((layer >= 1) & (layer <= 3)).any()
    # occlusion: some visible-at-start points vanish, mostly background behind movers
    assert 0.9 < vis.mean() < 0.995
    hidden = ~vis & (layer == 0)[:, None, :]
    assert hidden.sum() > 0.5 * (~vis).sum()


def test_image_size_does_not_change_labels():
    a = synth_clips(30, 4, SynthConfig(image_size=256))
    b = synth_clips(30, 4, SynthConfig(image_size=512))
    ra = label_summary(a["tracks"] * 0.5, a["visibility"])
    rb = label_summary(b["tracks"] * 0.25, b["visibility"])
    assert ra["center_before"] == pytest.approx(rb["center_before"], abs=0.01)
    assert ra["center_after"] == pytest.approx(rb["center_after"], abs=0.03)


def test_camera_shake_makes_background_move():
    calm = synth_clips(20, 8, SynthConfig(shake_prob=0.0), with_layers=True)
    shaky = synth_clips(20, 8, SynthConfig(shake_prob=1.0, camera_shake=1.0), with_layers=True)

    def bg_speed(d):
        s = np.linalg.norm(np.diff(d["tracks"], axis=1), axis=-1)
        return np.median(s[(d["layer"] == 0)[:, None, :].repeat(15, 1)])

    assert bg_speed(shaky) > 3 * bg_speed(calm)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="grid"):
        SynthConfig(grid=0)
    with pytest.raises(ValueError, match="camera_shake"):
        SynthConfig(camera_shake=-1)


def test_synth_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["synth", "--out", str(out), "--clips", "7", "--seed", "2", "--clips-per-file", "3",
               "--grid", "8", "--frames", "20", "--image-size", "128", "--no-progress"])
    assert rc == 0
    files = list_inputs([out])
    assert [f.rsplit("/", 1)[1] for f in files] == ["synth-000000.npz", "synth-000001.npz", "synth-000002.npz"]
    seqs = [s for f in files for s in iter_sequences(f)]
    assert len(seqs) == 7 and seqs[0].vel.shape == (19, 64, 2)
    assert [s.start_frame for s in seqs] == [i * 20 for i in range(7)]
    meta = json.loads((out / "synth.json").read_text())
    assert meta["clips"] == 7 and meta["config"]["grid"] == 8
    assert main(["synth", "--out", str(out), "--clips", "0"]) == 2


def test_synth_never_mixes_with_older_files(tmp_path, capsys):
    out = tmp_path / "syn"
    small = ["--grid", "4", "--frames", "12", "--no-progress"]
    assert main(["synth", "--out", str(out), "--clips", "6", "--clips-per-file", "2", *small]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 4  # 3 data files + synth.json
    capsys.readouterr()
    # earlier synth output: refused without --overwrite, untouched
    assert main(["synth", "--out", str(out), "--clips", "2", "--clips-per-file", "2", "--seed", "1", *small]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err and "\n" not in err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces it: no file of the earlier run is left for build-shards to pick up
    assert main(["synth", "--out", str(out), "--clips", "2", "--clips-per-file", "2", "--seed", "1", "--overwrite",
                 *small]) == 0
    assert "removed 4 earlier synth files" in capsys.readouterr().out
    assert [f.rsplit("/", 1)[1] for f in list_inputs([out])] == ["synth-000000.npz"]
    assert json.loads((out / "synth.json").read_text())["seed"] == 1
    # a file synth did not write: refused even with --overwrite, and nothing is removed
    (out / "mine.npz").write_bytes(b"user data")
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert main(["synth", "--out", str(out), "--clips", "2", *small, *extra]) == 2
        err = capsys.readouterr().err
        assert "mine.npz" in err and "new or empty --out" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
