import numpy as np
import pytest

from motion_data.read.split import MIN_SOURCES_FOR_FILE_SPLIT, split_clips


def _frames_overlap(train, val, source, start, T):
    for s in set(source):
        tr = [start[i] for i in train if source[i] == s]
        va = [start[i] for i in val if source[i] == s]
        for a in tr:
            for b in va:
                if a < b + T and b < a + T:
                    return True
    return False


@pytest.mark.parametrize("stride", [1, 4, 16, 20])
def test_time_block_split_has_no_shared_frames(stride):
    T = 16
    source = ["a.h5"] * 40 + ["b.h5"] * 25 + ["c.h5"] * 1
    start = list(np.arange(40) * stride) + list(np.arange(25) * stride + 7) + [0]
    # shuffle the row order: the split must not depend on it
    perm = np.random.default_rng(0).permutation(len(source))
    source = [source[i] for i in perm]
    start = [start[i] for i in perm]
    train, val = split_clips(source, start, 0.2, T)
    assert len(set(train) & set(val)) == 0
    assert not _frames_overlap(train, val, source, start, T)
    # each multi-clip source gives its last 20% of clips; one-clip sources stay in training
    assert sum(source[i] == "a.h5" for i in val) == 8
    assert sum(source[i] == "b.h5" for i in val) == 5
    assert [source[i] for i in train].count("c.h5") == 1
    # the gap drops exactly the windows overlapping the block
    dropped = set(range(len(source))) - set(train) - set(val)
    assert len(dropped) == 2 * (int(np.ceil(T / stride)) - 1)


def test_split_is_deterministic_and_order_free():
    source = [f"s{i % 3}" for i in range(30)]
    start = [i // 3 * 16 for i in range(30)]
    a = split_clips(source, start, 0.1, 16)
    perm = np.random.default_rng(1).permutation(30)
    b = split_clips([source[i] for i in perm], [start[i] for i in perm], 0.1, 16)
    assert sorted(np.array(a[1]).tolist()) == sorted(perm[b[1]].tolist())


def test_file_split_holds_out_whole_sources():
    n_src = MIN_SOURCES_FOR_FILE_SPLIT + 5
    source = [f"v{i % n_src}.mp4" for i in range(200)]
    start = [(i // n_src) * 4 for i in range(200)]
    train, val = split_clips(source, start, 0.2, 16)
    tr_src = {source[i] for i in train}
    va_src = {source[i] for i in val}
    assert tr_src.isdisjoint(va_src) and va_src
    assert len(train) + len(val) == 200
    assert 0.2 <= len(val) / 200 < 0.2 + 1 / n_src + 1e-9


def test_zero_split_and_bad_fraction():
    train, val = split_clips(["a"] * 5, range(5), 0.0, 16)
    assert len(train) == 5 and len(val) == 0
    with pytest.raises(ValueError):
        split_clips(["a"], [0], 1.0, 16)


@pytest.mark.parametrize("n_files", [2, 6])  # time-block split and whole-source split
def test_moving_the_input_folder_keeps_split_and_clip_ids(tmp_path, n_files):
    import shutil

    from conftest import make_track_file
    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options
    from motion_data.build.folder import BuildDir
    from motion_data.read.split import split_manifest

    a = tmp_path / "here" / "tracks"
    for i in range(n_files):
        make_track_file(a / f"cam{i}.npz", B=2, T=40, seed=i)
    make_track_file(a / "sub" / "deep.npz", B=1, T=40, seed=99)  # names keep the sub-folder
    b = tmp_path / "somewhere" / "else" / "moved"
    shutil.copytree(a, b)
    results = []
    for src, out in ((a, tmp_path / "out_a"), (b, tmp_path / "out_b")):
        build([str(src)], out, Options(maxcount=7), progress=False)
        man = BuildDir(out).manifest(["clip_id", "source", "split_group", "start_frame"])
        tr, va = split_manifest(man, 0.25, 16)
        results.append((man, tr, va))
        assert "sub/deep.npz" in man["source"] and not any(s.startswith("/") for s in man["source"])
    (ma, tra, vaa), (mb, trb, vab) = results
    assert ma == mb  # clip ids, sources and split groups
    assert len(vaa) and len(tra)
    np.testing.assert_array_equal(tra, trb)
    np.testing.assert_array_equal(vaa, vab)
    # the shards (whose samples carry the source name and clip id) are byte-identical too
    for s in sorted((tmp_path / "out_a" / "shards").iterdir()):
        assert s.read_bytes() == (tmp_path / "out_b" / "shards" / s.name).read_bytes()


def test_the_same_files_named_from_another_root_are_another_build(tmp_path):
    # `--input data/a` and `--input data/a/sub` list the same file but name it differently
    # (sub/x.npz vs x.npz); the names are in the clip ids, so the second is not "up to date"
    import pytest

    from conftest import make_track_file
    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options
    from motion_data.common.errors import DataError

    a = tmp_path / "a"
    make_track_file(a / "sub" / "x.npz", B=1, T=40, seed=1)
    out = tmp_path / "out"
    build([str(a)], out, Options(maxcount=7), progress=False)
    assert build([str(a)], out, Options(maxcount=7), progress=False)["status"] == "up-to-date"
    with pytest.raises(DataError, match="names relative to the input root"):
        build([str(a / "sub")], out, Options(maxcount=7), progress=False)


def test_a_build_of_the_older_naming_is_refused_saying_so(tmp_path):
    import json

    import pytest

    from conftest import make_track_file
    from motion_data.build.build_shards import build
    from motion_data.build.setup import Options
    from motion_data.common.errors import DataError

    make_track_file(tmp_path / "in" / "a.npz", B=1, T=40, seed=1)
    out = tmp_path / "out"
    build([str(tmp_path / "in")], out, Options(maxcount=7), progress=False)
    doc = json.loads((out / "build.json").read_text())
    del doc["config"]["source_names"]  # what the previous version recorded
    (out / "build.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="older build-shards.*--overwrite"):
        build([str(tmp_path / "in")], out, Options(maxcount=7), progress=False)
    assert build([str(tmp_path / "in")], out, Options(maxcount=7), progress=False, overwrite=True)["status"] != "up-to-date"
