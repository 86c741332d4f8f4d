"""The Python API (tokenizer_train.use.api) and the ``decode`` command on tiny trained runs."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from motion_data.build.folder import BuildDir
from motion_data.common.errors import DataError, UserError
from motion_data.common.labels import class_offsets, normalize, velocities
from tokenizer_train.__main__ import main
from tokenizer_train.use.api import load_tokenizer
from tokenizer_train.common.config import from_dict
from tokenizer_train.train.trainer import train
from motion_data.read.clips import read_clips

sys.path.insert(0, str(Path(__file__).parent))
from harness import TINY  # noqa: E402
from loader_fixtures import write_build  # noqa: E402
POS_ENC = ["model.decoder=code_query", "model.point_pos_enc.enabled=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(build, {"pos": run with point_pos_enc + code_query, "plain": the default model}, codes Parquet per run)."""
    build = write_build(tmp_path_factory.mktemp("build"), shard_sizes=(6, 6), sources=["v/a.h5", "v/b.h5"])
    root = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out, codes = {}, {}
    try:
        for name, extra in (("pos", POS_ENC), ("plain", [])):
            out[name] = root / name
            train(from_dict({}, TINY + extra), build, out[name])
            codes[name] = root / f"{name}.parquet"
            assert main(["tokenize", "--run", str(out[name]), "--data", str(build), "--out", str(codes[name])]) == 0
    finally:
        torch.set_num_threads(n)
    return build, out, codes


def _all_clips(build):
    b = BuildDir(build)
    ids = pq.read_table(build / "manifest.parquet").to_pydict()["clip_id"]
    pos, vis, _ = read_clips(b, np.arange(b.n_clips))
    return ids, pos, vis


@pytest.mark.parametrize("kind", ["pos", "plain"])
def test_encode_equals_tokenize_and_decode_equals_forward_argmax(runs, kind):
    build, run, codes_pq = runs
    tok = load_tokenizer(run[kind], device="cpu")
    assert not tok.model.training and tok.device == torch.device("cpu")
    assert tok.needs_start_pos == (kind == "pos")
    ids, pos, _ = _all_clips(build)
    t = pq.read_table(codes_pq[kind]).to_pydict()
    assert t["clip_id"] == ids
    codes = tok.encode(pos)  # numpy (B, T, N, 2) reference px
    assert codes.dtype == torch.int64 and codes.tolist() == t["codes"]
    # the same from normalised velocities (+ start positions), and for one clip without a batch axis
    v = normalize(velocities(pos), tok.W)
    assert torch.equal(tok.encode(velocities_norm=v, start_pos=pos[:, 0]), codes)
    assert tok.encode(pos[3]).tolist() == t["codes"][3]
    # decode: the argmax of the model's own forward logits on these clips
    start = torch.from_numpy(pos[:, 0]) if tok.needs_start_pos else None
    with torch.no_grad():
        fwd = tok.model(torch.from_numpy(v), start)
    assert torch.equal(fwd["codes"], codes)
    d = tok.decode(codes, pos[:, 0])
    B, S, N = v.shape[:3]
    assert d.classes.shape == (B, S, N) and d.displacement.shape == (B, S, N, 2)
    assert torch.equal(d.classes, fwd["logits"].argmax(-1))
    assert torch.allclose(d.logits, fwd["logits"], atol=1e-5)
    assert np.array_equal(d.displacement.numpy(), class_offsets(tok.W)[d.classes.numpy()])
    assert torch.allclose(d.confidence, fwd["logits"].softmax(-1).max(-1).values, atol=1e-6)
    assert tok.decode(codes, pos[:, 0], logits=False).logits is None
    one = tok.decode(codes[5], pos[5, 0])
    assert torch.equal(one.classes, d.classes[5])


def test_api_errors_name_the_problem(runs, tmp_path):
    build, run, _ = runs
    with pytest.raises(DataError, match=str(tmp_path / "nowhere" / "best.pt")):
        load_tokenizer(tmp_path / "nowhere", device="cpu")
    tok = load_tokenizer(run["pos"], device="cpu")
    _, pos, _ = _all_clips(build)
    codes = tok.encode(pos[:2])
    with pytest.raises(ValueError, match="start_pos"):
        tok.decode(codes)
    with pytest.raises(ValueError, match="code ids must be in"):
        tok.decode(codes + tok.codebook_size, pos[:2, 0])
    with pytest.raises(ValueError, match="exactly one"):
        tok.encode()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            load_tokenizer(run["pos"], device="cuda")


@pytest.mark.parametrize("kind", ["pos", "plain"])
def test_decode_command_writes_npz(runs, tmp_path, kind):
    build, run, codes_pq = runs
    out = tmp_path / "sub" / "decoded.npz"
    assert main(["decode", "--run", str(run[kind]), "--codes", str(codes_pq[kind]), "--data", str(build),
                 "--out", str(out), "--batch-size", "5", "--device", "cpu"]) == 0
    z = np.load(out)
    ids, pos, _ = _all_clips(build)
    tok = load_tokenizer(run[kind], device="cpu")
    d = tok.decode(tok.encode(pos), pos[:, 0])
    assert z["clip_id"].tolist() == ids
    assert z["classes"].dtype == np.int16 and np.array_equal(z["classes"], d.classes.numpy())
    assert np.array_equal(z["displacement"], d.displacement.numpy())
    assert np.allclose(z["confidence"], d.confidence.numpy())
    assert np.array_equal(z["start_pos"], pos[:, 0]) and int(z["W"]) == 15 and int(z["ref_size"]) == 128
    if kind == "plain":  # no start positions needed: --data is optional
        assert main(["decode", "--run", str(run[kind]), "--codes", str(codes_pq[kind]), "--out", str(out),
                     "--device", "cpu"]) == 0
        z2 = np.load(out)
        assert "start_pos" not in z2.files and np.array_equal(z2["classes"], z["classes"])


def test_decode_command_errors_are_one_line(runs, tmp_path, capsys):
    build, run, codes_pq = runs
    out = tmp_path / "d.npz"
    base = ["decode", "--run", str(run["pos"]), "--out", str(out), "--device", "cpu"]
    assert main(base + ["--codes", str(codes_pq["pos"])]) == 2  # pos enc without --data
    err = capsys.readouterr().err.strip()
    assert "--data" in err and "point_pos_enc" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert main(base + ["--codes", str(bad), "--data", str(build)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
    other = write_build(tmp_path / "other", shard_sizes=(3,), sources=["v/z.h5"], seed=3)
    assert main(base + ["--codes", str(codes_pq["pos"]), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no clip" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_load_clips_gives_a_splits_positions_and_a_wrong_point_count_names_the_positions_shape(runs):
    from motion_data.read.split import split_manifest
    from tokenizer_train.use.api import load_clips, load_tokenizer

    build, out, _ = runs
    tok = load_tokenizer(out["plain"], device="cpu")
    val = load_clips(build, "val", tok.config.data.val_split)
    man = pq.read_table(build / "manifest.parquet").to_pydict()
    _, rows = split_manifest(man, tok.config.data.val_split, 16)
    assert val["clip_id"] == [man["clip_id"][r] for r in rows] and val["positions"].shape[0] == len(rows)
    assert tok.encode(val["positions"]).shape[0] == len(rows)
    assert len(load_clips(build, "all", limit=3)["clip_id"]) == 3
    with pytest.raises(ValueError, match=r"positions must be \(B, T, N, 2\).*N = 16"):
        tok.encode(val["positions"][:, :, :10])
