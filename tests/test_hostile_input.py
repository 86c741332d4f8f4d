"""Hostile and malformed input, made by the tests: every bad file gives one clear line
naming it (``--on-error fail``) or is skipped and reported with every good clip still
written (``--on-error skip``); nothing is ever unpickled (a payload that would create a
marker file never runs); shards with unsafe member names, truncated shards and a manifest
that disagrees with its shards are refused with the file named."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_track_file, make_tracks
from motion_data.common.errors import DataError
from motion_data.sources.importers import iter_sequences
from motion_data.read.loader import LoaderOptions, make_loader
from motion_data.read.verify import verify_build
from motion_data.read.shard_reader import read_sample
from preprocess.__main__ import main
from test_build import assert_same_content

h5py = pytest.importorskip("h5py")
torch = pytest.importorskip("torch")


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _cut(src: Path, dst: Path, frac: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def _amplify_h5(path, n=3, grid=10, seed=0):
    tracks, vis = make_tracks(B=n, T=16, grid=grid, image_size=(128, 128), seed=seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("root/agentview/tracks", data=tracks)
        f.create_dataset("root/agentview/vis", data=vis)
    return path


def _forged_npy_bytes(shape):
    import io

    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return b.getvalue() + b"\0" * 256


def make_corpus(d: Path, marker: Path) -> tuple[list[Path], dict[str, Path]]:
    """(good files, {case: bad file}); every file has N = 100 points unless that is its fault."""
    d.mkdir(parents=True, exist_ok=True)
    good = [make_track_file(d / "a_g1.npz", B=2, T=32, seed=1), make_track_file(d / "a_g2.npz", B=1, T=24, seed=2),
            _amplify_h5(d / "a_g3.h5", n=3, seed=3)]
    tr, vis = make_tracks(B=1, T=20, seed=4)
    torch.save({"tracks": torch.from_numpy(tr), "visibility": torch.from_numpy(vis),
                "image_size": torch.tensor([96, 128])}, d / "a_g4.pt")
    good.append(d / "a_g4.pt")
    size = np.array([96, 128])
    bad = {}
    t = tr.copy()
    t[0, 5, 7, 0] = np.nan
    bad["nan"] = _npz(d / "b_nan.npz", tracks=t, visibility=vis, image_size=size)
    t = tr.copy()
    t[0, 3, 2, 1] = np.inf
    bad["inf"] = _npz(d / "b_inf.npz", tracks=t, image_size=size)
    bad["rank"] = _npz(d / "b_rank.npz", tracks=tr[0, :, :, 0], image_size=size)
    bad["coords3"] = _npz(d / "b_coords3.npz", tracks=np.zeros((20, 100, 3), np.float32), image_size=size)
    bad["zero_points"] = _npz(d / "b_zero_points.npz", tracks=np.zeros((20, 0, 2), np.float32), image_size=size)
    bad["vis_size"] = _npz(d / "b_vis_size.npz", tracks=tr, visibility=vis[:, :, :50], image_size=size)
    bad["other_n"] = make_track_file(d / "b_other_n.npz", B=1, T=20, grid=8, seed=5)
    bad["short"] = make_track_file(d / "b_short.npz", B=2, T=10, seed=6)
    for ext in ("npz", "npy", "pt", "h5"):
        (d / f"b_empty.{ext}").write_bytes(b"")
        bad[f"empty_{ext}"] = d / f"b_empty.{ext}"
    bad["truncated_npz"] = _cut(good[0], d / "b_trunc.npz", 0.5)
    bad["truncated_h5"] = _cut(good[2], d / "b_trunc.h5", 0.4)
    bad["truncated_pt"] = _cut(good[3], d / "b_trunc.pt", 0.6)
    (d / "b_garbage.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    bad["garbage_h5"] = d / "b_garbage.h5"
    (d / "b_forged.npy").write_bytes(_forged_npy_bytes((10 ** 6, 10 ** 6, 2)))
    bad["forged_npy"] = d / "b_forged.npy"
    import zipfile
    with zipfile.ZipFile(d / "b_forged.npz", "w") as z:
        z.writestr("tracks.npy", _forged_npy_bytes((10 ** 5, 10 ** 5, 2)))
        z.writestr("image_size.npy", _forged_npy_bytes((2,))[:128])
    bad["forged_npz"] = d / "b_forged.npz"
    # pickles whose payload would create the marker file
    np.save(d / "b_pickle.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    bad["pickle_npy"] = d / "b_pickle.npy"
    np.savez(d / "b_pickle.npz", tracks=np.array([Payload(marker)], dtype=object), image_size=size)
    bad["pickle_npz"] = d / "b_pickle.npz"
    torch.save({"tracks": torch.from_numpy(tr), "image_size": torch.tensor([96, 128]), "x": Payload(marker)},
               d / "b_pickle.pt")
    bad["pickle_pt"] = d / "b_pickle.pt"
    return good, bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PAYLOAD_RAN"
    good, bad = make_corpus(root / "in", marker)
    return root, marker, good, bad


def _build(*argv):
    return main(["build-shards", *map(str, argv), "--no-progress"])


def test_every_bad_file_alone_fails_with_one_line_naming_it(corpus, tmp_path, capsys):
    root, marker, good, bad = corpus
    for case, path in bad.items():
        rc = _build("--input", good[0], path, "--out", tmp_path / case)
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert "\n" not in err and str(path) in err, (case, err)
        assert "Traceback" not in err
    assert not marker.exists()


def test_skip_reports_every_bad_file_and_writes_every_good_clip(corpus, tmp_path, capsys):
    root, marker, good, bad = corpus
    out, ref = tmp_path / "all", tmp_path / "good_only"
    assert _build("--input", root / "in", "--out", out, "--on-error", "skip", "--maxcount", 4) == 0
    text = capsys.readouterr().out
    assert not marker.exists()
    doc = json.loads((out / "build.json").read_text())
    skipped = {s["path"]: s["reason"] for s in doc["summary"]["skipped"]}
    assert set(skipped) == {str(p) for p in bad.values()}
    for path, reason in skipped.items():
        assert reason.startswith(path) and "\n" not in reason
        assert reason in text  # reported on the console too
    assert "pickled" in skipped[str(bad["pickle_pt"])] and "pickled" in skipped[str(bad["pickle_npy"])]
    assert "pickled" in skipped[str(bad["pickle_npz"])]
    assert "forged" in skipped[str(bad["forged_npy"])] and "forged" in skipped[str(bad["forged_npz"])]
    # every good clip is there, exactly as in a build of the good files alone
    assert _build("--input", *good, "--out", ref, "--maxcount", 4) == 0
    assert_same_content(out, ref)
    assert doc["summary"]["clips"] == 2 * 3 + 2 + 3 + 1 and doc["summary"]["inputs_used"] == len(good)
    assert verify_build(out) == 12


def test_pickle_payloads_are_live_but_never_run(corpus, tmp_path):
    """The proof is not vacuous: unpickling the same files on purpose does run the payload."""
    root, marker, good, bad = corpus
    for case in ("pickle_npy", "pickle_npz", "pickle_pt"):
        with pytest.raises(DataError, match="pickled"):
            list(iter_sequences(bad[case], image_size=(96, 128)))
    assert not marker.exists()
    np.load(bad["pickle_npy"], allow_pickle=True)  # what allow_pickle=True would have done
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("name", ["a_g1.npz", "a_g3.h5", "a_g4.pt", "flat.npy"])
def test_every_truncation_is_an_input_error(corpus, tmp_path, name):
    root, marker, good, bad = corpus
    if name == "flat.npy":
        src = tmp_path / "flat.npy"
        np.save(src, make_tracks(B=1, T=20)[0][0])
    else:
        src = root / "in" / name
    data = src.read_bytes()
    (seq, *_) = iter_sequences(src, image_size=(96, 128))  # the whole file is fine
    for cut in sorted({0, 1, 8, 64, 200, 511, 1024} | {int(len(data) * f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)} |
                      {len(data) - 1}):
        if cut >= len(data):
            continue
        p = tmp_path / f"cut{cut}{src.suffix}"
        p.write_bytes(data[:cut])
        with pytest.raises(DataError) as e:
            list(iter_sequences(p, image_size=(96, 128)))
        msg = str(e.value)
        assert msg.startswith(str(p)) and "\n" not in msg, (cut, msg)


# ------------------------------------------------------------------ shards and manifest


@pytest.fixture
def build_copy(tiny_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    return out


def _rewrite_members(shard: Path, rename):
    """Rewrite a shard with some member names changed (same sizes, so same offsets)."""
    src = shard.read_bytes()
    tmp = shard.with_name("x.tar")
    with tarfile.open(fileobj=__import__("io").BytesIO(src)) as tin, \
            tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            m.name = rename(m.name)
            tout.addfile(m, __import__("io").BytesIO(data))
    tmp.replace(shard)


@pytest.mark.parametrize("prefix", ["../../", "/tmp/"])
def test_unsafe_member_names_are_refused(build_copy, tmp_path, prefix):
    man = pq.read_table(build_copy / "manifest.parquet").to_pylist()
    bad_id = man[1]["clip_id"]
    shard = build_copy / man[1]["shard"]
    _rewrite_members(shard, lambda n: prefix + n if n.startswith(bad_id) else n)
    with pytest.raises(DataError, match="unsafe member name") as e:
        read_sample(shard, man[1]["offset"], man[1]["size"], bad_id)
    assert str(shard) in str(e.value)
    # the loader refuses it too (fail), or drops just that clip (skip)
    with pytest.raises(DataError) as e:
        for _ in make_loader(build_copy, LoaderOptions(batch_size=60), split="all"):
            pass
    assert str(shard) in str(e.value) and "\n" not in str(e.value)
    loader = make_loader(build_copy, LoaderOptions(batch_size=60, on_error="skip"), split="all")
    ids = [c for b in loader for c in b["clip_id"]]
    assert bad_id not in ids and len(ids) == 59 and loader.skipped == 1
    assert not list(Path("/tmp").glob(f"{bad_id}*")) and not (tmp_path.parent / f"{bad_id}.pos.npy").exists()
    with pytest.raises(DataError, match=r"manifest\.parquet"):
        verify_build(build_copy)


def test_truncated_shard_is_named(build_copy):
    shard = build_copy / "shards" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(DataError) as e:
        verify_build(build_copy)
    assert "shard-000001.tar" in str(e.value) and "manifest.parquet" in str(e.value)
    with pytest.raises(DataError, match="shard-000001.tar"):
        for _ in make_loader(build_copy, LoaderOptions(batch_size=60), split="all"):
            pass


def _edit_manifest(build_dir, fn):
    t = pq.read_table(build_dir / "manifest.parquet")
    pq.write_table(fn(t), build_dir / "manifest.parquet")


def test_manifest_with_swapped_offsets_is_refused(build_copy):
    def swap(t):
        off = t.column("offset").to_numpy().copy()
        off[[0, 1]] = off[[1, 0]]
        return t.set_column(t.schema.get_field_index("offset"), "offset", pa.array(off, pa.int64()))

    _edit_manifest(build_copy, swap)
    with pytest.raises(DataError) as e:
        verify_build(build_copy)
    msg = str(e.value)
    assert str(build_copy / "manifest.parquet") in msg and "shard-000000.tar" in msg and "\n" not in msg
    with pytest.raises(DataError) as e:
        for _ in make_loader(build_copy, LoaderOptions(batch_size=8), split="all"):
            pass
    assert "shard-000000.tar" in str(e.value) and "does not belong" in str(e.value)


def test_manifest_missing_rows_or_shard_is_refused(build_copy):
    _edit_manifest(build_copy, lambda t: t.slice(0, 59))
    with pytest.raises(ValueError, match=r"manifest\.parquet: 59 rows but .*stats\.zarr holds 60 clips"):
        make_loader(build_copy, LoaderOptions(batch_size=8), split="all")
    with pytest.raises(DataError, match=r"shard-000002\.tar holds 10 samples, the manifest lists 9"):
        verify_build(build_copy)
    (build_copy / "shards" / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match=r"manifest\.parquet: shard shards/shard-000002\.tar does not exist"):
        verify_build(build_copy)


def test_manifest_range_past_the_shard_end_is_named(build_copy):
    def grow(t):
        size = t.column("size").to_numpy().copy()
        size[-1] += 512 * 100
        return t.set_column(t.schema.get_field_index("size"), "size", pa.array(size, pa.int64()))

    _edit_manifest(build_copy, grow)
    with pytest.raises(DataError, match=r"shard-000002\.tar.*truncated"):
        for _ in make_loader(build_copy, LoaderOptions(batch_size=60), split="all"):
            pass
    with pytest.raises(DataError, match="manifest.parquet"):
        verify_build(build_copy)
