"""--part i/n builds joined by merge equal one build over all inputs."""
from __future__ import annotations

import json

import pytest

from motion_data.build import build_shards as bld
from motion_data.build.manifest import read_manifest
from motion_data.build.setup import Options
from motion_data.read.shard_reader import read_sample
from preprocess.__main__ import main
from test_build import assert_same_content, run_cli


@pytest.fixture(scope="module")
def parts(tiny_tracks, tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    for i in range(2):
        assert run_cli("--input", tiny_tracks, "--out", d / f"p{i}", "--maxcount", 7, "--part", f"{i}/2",
                       "--no-progress") == 0
    return d


def test_parts_take_every_nth_input(parts, tiny_tracks):
    names = [sorted({r.split("/")[-1] for r in read_manifest(parts / f"p{i}").column("source").to_pylist()})
             for i in range(2)]
    assert names == [["cam_a.npz", "cam_c.npz"], ["cam_b.npz", "solo.npz"]]


def test_merge_equals_a_single_run(parts, tiny_tracks, tmp_path, capsys):
    out = tmp_path / "merged"
    # order of the part folders on the command line does not matter
    assert main(["merge", str(parts / "p1"), str(parts / "p0"), "--out", str(out)]) == 0
    assert "60 clips" in capsys.readouterr().out
    single = tmp_path / "single"
    assert run_cli("--input", tiny_tracks, "--out", single, "--maxcount", 7, "--no-progress") == 0
    assert_same_content(out, single, offsets=False)
    t = read_manifest(out, build_dir=out)
    shards = sorted(set(t.column("shard").to_pylist()))
    # part 0 holds 36 clips (6 shards of <= 7), part 1 holds 24 (4 shards)
    assert shards == [f"shards/shard-{i:06d}.tar" for i in range(10)]
    for r in t.to_pylist()[::7]:
        assert read_sample(out / r["shard"], r["offset"], r["size"], r["clip_id"])["key"] == r["clip_id"]
    doc = json.loads((out / "build.json").read_text())
    assert doc["config"]["part"] is None and doc["summary"]["clips"] == 60
    assert [i["global_index"] for i in doc["inputs"]] == [0, 1, 2, 3]
    # the merged folder counts as the finished single build of the same arguments
    s = bld.build([str(tiny_tracks)], out, Options(maxcount=7), progress=False)
    assert s["status"] == "up-to-date"


def test_merge_refuses_incomplete_or_mixed_parts(parts, tiny_tracks, tmp_path, capsys):
    assert main(["merge", str(parts / "p0"), "--out", str(tmp_path / "m1")]) == 2
    assert "parts missing: 1/2" in capsys.readouterr().err
    assert main(["merge", str(parts / "p0"), str(parts / "p0"), "--out", str(tmp_path / "m2")]) == 2
    assert "part given twice" in capsys.readouterr().err
    other = tmp_path / "other"
    assert run_cli("--input", tiny_tracks, "--out", other, "--maxcount", 9, "--part", "1/2", "--no-progress") == 0
    capsys.readouterr()
    assert main(["merge", str(parts / "p0"), str(other), "--out", str(tmp_path / "m3")]) == 2
    assert "maxcount" in capsys.readouterr().err
    assert main(["merge", str(parts / "p0"), str(tmp_path / "nothing"), "--out", str(tmp_path / "m4")]) == 2
    assert "not a finished build" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m3").exists()


def test_part_without_inputs_is_an_error(tiny_tracks, tmp_path, capsys):
    assert run_cli("--input", tiny_tracks, "--out", tmp_path / "o", "--part", "5/6", "--no-progress") == 2
    assert "only 4 input files" in capsys.readouterr().err
    assert run_cli("--input", tiny_tracks, "--out", tmp_path / "o", "--part", "2/2", "--no-progress") == 2
    assert "0 <= i < n" in capsys.readouterr().err
