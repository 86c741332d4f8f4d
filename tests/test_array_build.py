"""Array builds (--plan-only, --task i/n in any order, --finalize) equal the one-process build
byte for byte: every shard, manifest.parquet and every stats.zarr array."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import TINY_MAXCOUNT
from preprocess.__main__ import main as pre


def _arrays(root: Path) -> dict:
    g = zarr.open_group(str(root / "stats.zarr"), mode="r")
    out = {}

    def walk(grp, prefix=""):
        for name, a in grp.arrays():
            out[prefix + name] = a[...]
        for name, sub in grp.groups():
            walk(sub, prefix + name + "/")

    walk(g)
    return out


def assert_same_build(a: Path, b: Path):
    sa = sorted(p.name for p in (a / "shards").iterdir())
    assert sa == sorted(p.name for p in (b / "shards").iterdir()) and sa
    for name in sa:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    assert (a / "manifest.parquet").read_bytes() == (b / "manifest.parquet").read_bytes()
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys() and xa
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_array_build_out_of_order_equals_the_one_process_build(tiny_tracks, tiny_build, tmp_path, capsys):
    out = tmp_path / "arr"
    common = ["build-shards", "--out", str(out), "--no-progress"]
    assert pre(common + ["--input", str(tiny_tracks), "--maxcount", str(TINY_MAXCOUNT), "--plan-only",
                         "--workers", "2"]) == 0
    assert "3 shards" in capsys.readouterr().out
    assert pre(common + ["--task", "2/3"]) == 0
    assert pre(common + ["--finalize"]) == 2  # shards 0 and 1 are missing: refused, naming the way on
    err = capsys.readouterr().err
    assert "2 of 3 shards are not written" in err and "--task" in err
    assert pre(common + ["--task", "0/3"]) == 0
    assert pre(common + ["--task", "0/3"]) == 0  # again: nothing to write
    assert "0 shards written, 1 already there" in capsys.readouterr().out
    assert pre(common + ["--task", "1/3"]) == 0
    assert pre(common + ["--finalize"]) == 0
    assert_same_build(out, tiny_build)
    assert pre(["build-shards", "--input", str(tiny_tracks), "--out", str(out), "--maxcount", str(TINY_MAXCOUNT),
                "--no-progress"]) == 0  # the one-process command sees the finished build as its own
    assert "nothing to do" in capsys.readouterr().out


def test_a_task_killed_mid_range_is_rerun_to_the_same_bytes(tiny_tracks, tiny_build, tmp_path, monkeypatch):
    import motion_data.build.plan as P

    out = tmp_path / "arr"
    assert pre(["build-shards", "--input", str(tiny_tracks), "--out", str(out), "--maxcount", str(TINY_MAXCOUNT),
                "--plan-only", "--no-progress"]) == 0
    real, calls = P.write_shard_and_record, []

    def dies_on_the_second(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a)

    monkeypatch.setattr(P, "write_shard_and_record", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        P.run_task(out, 0, 1)
    monkeypatch.setattr(P, "write_shard_and_record", real)
    assert P.run_task(out, 0, 1) == {"task": "0/1", "shards_written": 2, "shards_already_done": 1}
    P.finalize_plan(out)
    assert_same_build(out, tiny_build)


def test_task_steps_need_a_plan(tmp_path, capsys):
    assert pre(["build-shards", "--out", str(tmp_path / "none"), "--task", "0/2", "--no-progress"]) == 2
    assert "--plan-only" in capsys.readouterr().err
    assert pre(["build-shards", "--out", str(tmp_path / "none"), "--task", "2/2", "--no-progress"]) == 2


def test_on_error_skip_array_build_skips_and_lists_what_one_build_does(tmp_path, capsys):
    """Bad files under --on-error skip: the array build leaves out the same inputs, lists the
    same reasons and writes the same bytes as the one-process build."""
    import json

    from test_build import make_bad_inputs

    d = make_bad_inputs(tmp_path)
    one, arr = tmp_path / "one", tmp_path / "arr"
    base = ["build-shards", "--input", str(d), "--on-error", "skip", "--maxcount", "2", "--no-progress"]
    assert pre(base + ["--out", str(one)]) == 0
    assert pre(base + ["--out", str(arr), "--plan-only"]) == 0
    assert pre(["build-shards", "--out", str(arr), "--task", "1/2", "--no-progress"]) == 0
    assert pre(["build-shards", "--out", str(arr), "--task", "0/2", "--no-progress"]) == 0
    assert pre(["build-shards", "--out", str(arr), "--finalize", "--no-progress"]) == 0
    capsys.readouterr()
    assert_same_build(arr, one)
    docs = [json.loads((x / "build.json").read_text())["summary"] for x in (one, arr)]
    assert docs[0]["skipped"] == docs[1]["skipped"] and len(docs[0]["skipped"]) == 4
    assert docs[0]["sequences_skipped"] == docs[1]["sequences_skipped"]


def test_the_plain_command_finishes_a_planned_build_and_finalize_records_it(tiny_tracks, tiny_build, tmp_path,
                                                                            capsys):
    """After --plan-only and one task, the one-process command finishes the build (same bytes);
    build.json records that command; --finalize again reports the build up to date."""
    import json

    out = tmp_path / "arr"
    plain = ["build-shards", "--input", str(tiny_tracks), "--out", str(out), "--maxcount", str(TINY_MAXCOUNT),
             "--no-progress"]
    assert pre(plain + ["--plan-only"]) == 0
    assert pre(["build-shards", "--out", str(out), "--task", "0/3", "--no-progress"]) == 0
    assert pre(plain) == 0
    assert_same_build(out, tiny_build)
    cmd = json.loads((out / "build.json").read_text())["command"]
    assert cmd[cmd.index("--input") + 1] == str(tiny_tracks) and cmd[cmd.index("--maxcount") + 1] == str(TINY_MAXCOUNT)
    capsys.readouterr()
    assert pre(["build-shards", "--out", str(out), "--finalize", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_task_refuses_an_input_changed_since_the_plan(tiny_tracks, tmp_path, capsys):
    import shutil

    tracks = tmp_path / "tracks"
    shutil.copytree(tiny_tracks, tracks)
    out = tmp_path / "arr"
    assert pre(["build-shards", "--input", str(tracks), "--out", str(out), "--maxcount", str(TINY_MAXCOUNT),
                "--plan-only", "--no-progress"]) == 0
    victim = sorted(tracks.iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1  # same size, other content
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert pre(["build-shards", "--out", str(out), "--task", "0/1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "changed since the plan" in err
