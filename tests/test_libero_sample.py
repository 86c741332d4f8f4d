"""The compact LIBERO sample: every label identical to the rendered tracks' (docs/DESIGN.md)."""
import json
from pathlib import Path

import numpy as np
import pytest

from motion_data.sources.libero import sample as LS
from motion_data.common.labels import labels_from_positions, step_valid
from motion_data.common.errors import DataError

RENDERED = sorted((Path(__file__).parent / "data" / "libero").glob("*.npz"))


def test_fixed_point_keeps_every_label_position_even_next_to_a_rounding_boundary():
    k = np.arange(0, 127, dtype=np.float32)
    eps = np.float32(1 / 4096)
    p = np.concatenate([k + 0.5 - eps, k + 0.5 + eps, k + 0.5, k - eps, k + eps, [-3.2, 131.7]]).astype(np.float32)
    q = LS.to_fixed(p, 128)
    back = LS.from_fixed(q)
    assert np.array_equal(np.rint(np.clip(back, 0, 127)), np.rint(np.clip(p, 0, 127)))
    assert np.abs(back - p).max() <= 1 / 512 + 1e-6
    # plain rounding to the same grid would have moved some of them
    plain = (np.rint(p.astype(np.float64) * 512) / 512).astype(np.float32)
    assert not np.array_equal(np.rint(np.clip(plain, 0, 127)), np.rint(np.clip(p, 0, 127)))


def test_pack_and_unpack_keep_labels_visibility_and_windows(tmp_path):
    assert RENDERED
    info = LS.pack(RENDERED, tmp_path / "s.npz", {"command": "test"})
    assert info["rollouts"] == len(RENDERED)
    files = LS.unpack(tmp_path / "out", tmp_path / "s.npz")
    for src, got in zip(RENDERED, files):
        a, b = np.load(src), np.load(got)
        assert np.array_equal(labels_from_positions(a["tracks"], 15), labels_from_positions(b["tracks"], 15))
        assert np.array_equal(a["visibility"], b["visibility"]) and np.array_equal(a["start_frame"], b["start_frame"])
        assert np.abs(a["tracks"] - b["tracks"]).max() <= 1 / 512 + 1e-6
    for r in LS.index(tmp_path / "s.npz"):
        name = r["name"]
        b = np.load(tmp_path / "out" / f"{name}.npz")
        assert LS.labels_crc(b["tracks"], b["visibility"], 128) == r["labels_crc32"]
    # float16 would not do: it changes many non-centre labels
    a = np.load(RENDERED[0])
    lab = labels_from_positions(a["tracks"], 15)
    half = labels_from_positions(a["tracks"].astype(np.float16).astype(np.float32), 15)
    moving = (lab != 112) & step_valid(a["visibility"])
    assert ((half != lab) & moving).sum() > 0.02 * moving.sum()


def test_a_damaged_sample_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        list(LS.read(bad))


@pytest.mark.skipif(not LS.SAMPLE.exists(), reason="the shipped sample is made by scripts in its .json")
def test_the_shipped_sample_unpacks_to_the_rendered_labels_and_stays_small(tmp_path):
    info = json.loads(LS.SAMPLE_INFO.read_text())
    assert "render-libero" in info["command"] and "--seed" in info["command"]
    assert LS.SAMPLE.stat().st_size <= 15e6
    idx = LS.index()
    assert 30 <= len(idx) <= 40 and len({r["name"].rsplit("_", 2)[0] for r in idx}) >= 3  # suites
    for (name, tracks, vis, start, size, frames), r in zip(LS.read(), idx):
        assert LS.labels_crc(tracks, vis, max(size)) == r["labels_crc32"], name
        assert frames


def test_a_truncated_sample_is_one_line_too(tmp_path):
    good = tmp_path / "s.npz"
    LS.pack(RENDERED[:1], good, {"command": "test"})
    bad = tmp_path / "cut.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.npz"):
        LS.index(bad)
    with pytest.raises(DataError, match="cut.npz"):
        list(LS.read(bad))
