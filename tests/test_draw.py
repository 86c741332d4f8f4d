"""``draw``: PNG and GIF pictures of a clip, with and without a run and a frame image."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from motion_data.read.split import split_manifest
from tokenizer_train.__main__ import main
from tokenizer_train.use.draw import BAND, CheckpointChoice, Picture, draw_clip

sys.path.insert(0, str(Path(__file__).parent))
from harness import TINY, train_one_thread  # noqa: E402
from loader_fixtures import write_build  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    build = write_build(tmp_path_factory.mktemp("build"), shard_sizes=(6, 6), sources=["v/a.h5", "v/b.h5"])
    run = train_one_thread(TINY + ["model.decoder=code_query", "model.point_pos_enc.enabled=true"], build,
                           tmp_path_factory.mktemp("run"))
    return build, run


def test_png_default_clip_is_the_first_validation_clip(tiny, tmp_path):
    build, run = tiny
    out, cid = draw_clip(build, tmp_path / "a" / "clip.png", run=run, picture=Picture(size=200),
                         checkpoint=CheckpointChoice(device="cpu"), progress=False)
    man = pq.read_table(build / "manifest.parquet").to_pydict()
    _, val = split_manifest(man, 0.25, 16)  # the run's data.val_split
    assert cid == man["clip_id"][val[0]]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (200, 200 + BAND)  # the title and legend band on top
        px = np.asarray(im.convert("RGB"))[BAND:]  # the image itself
    # something was drawn on the blank canvas: green labels and red predictions among white
    assert (px == 255).all(-1).mean() > 0.5
    green = (px[..., 1] > 100) & (px[..., 0] < 100) & (px[..., 2] < 100)
    red = (px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)
    assert green.any() and red.any()


def test_gif_has_one_frame_per_step_over_the_frame_image(tiny, tmp_path, capsys):
    build, run = tiny
    frame = tmp_path / "first.png"
    Image.new("RGB", (96, 64), (0, 0, 200)).save(frame)  # any size: stretched to the reference frame
    cid = pq.read_table(build / "manifest.parquet").to_pydict()["clip_id"][2]
    out = tmp_path / "clip.gif"
    assert main(["draw", "--data", str(build), "--clip", cid, "--run", str(run), "--frame", str(frame),
                 "--out", str(out), "--size", "160", "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.format == "GIF" and im.size == (160, 160 + BAND) and im.n_frames == 15  # T - 1 steps
        im.seek(0)
        px = np.asarray(im.convert("RGB"))[BAND:]
    err = capsys.readouterr().err
    assert "15/15" in err and "16/15" not in err  # the progress bar counts each frame once
    assert ((px[..., 2] > 150) & (px[..., 0] < 80)).mean() > 0.3  # the blue frame image is the background


def test_png_without_run(tiny, tmp_path):
    build, _ = tiny
    out = tmp_path / "plain.png"
    assert main(["draw", "--data", str(build), "--out", str(out), "--size", "128", "--val-split", "0"]) == 0
    with Image.open(out) as im:
        assert im.size == (128, 128 + BAND)
        px = np.asarray(im.convert("RGB"))  # band included: no red in the legend either
    red = (px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)
    assert not red.any() and out.stat().st_size > 0


def test_errors_are_one_line(tiny, tmp_path, capsys):
    build, run = tiny
    bad_frame = tmp_path / "x.png"
    bad_frame.write_text("no image")
    for argv, needle in ((["--out", str(tmp_path / "c.jpg")], ".png"),
                         (["--out", str(tmp_path / "c.png"), "--clip", "nope"], "nope"),
                         (["--out", str(tmp_path / "c.png"), "--frame", str(bad_frame)], str(bad_frame)),
                         (["--out", str(tmp_path / "c.png"), "--run", str(tmp_path / "norun")], "best.pt")):
        assert main(["draw", "--data", str(build)] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c.png").exists()


def test_compare_draws_one_panel_per_run_of_the_moving_points(tiny, tmp_path, capsys):
    build, run = tiny
    out = tmp_path / "cmp.png"
    assert main(["draw", "--data", str(build), "--compare", f"a={run}", f"b={run}", "--out", str(out), "--size", "200",
                 "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.size == (400, 200 + BAND)
        px = np.asarray(im.convert("RGB"))[BAND:]
    left, right = px[:, :200], px[:, 200:]
    # the same run twice: the same panel (but for anti-aliasing at the panels' shared edge)
    assert (np.abs(left[:, 4:-4].astype(int) - right[:, 4:-4].astype(int)) > 8).mean() < 0.01
    green = (left[..., 1] > 100) & (left[..., 0] < 100) & (left[..., 2] < 100)
    assert green.any()  # the true motion of the moving points
    assert main(["draw", "--data", str(build), "--compare", str(run), "--out", str(tmp_path / "c.gif")]) == 2
