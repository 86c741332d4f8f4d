"""frontier: centre-logit offsets, counts against hand-computed values, the CLI on a trained run."""
import json
import sys
from pathlib import Path

import pytest
import torch

from motion_data.common.labels import center_class
from tokenizer_train.evaluate import frontier as F
from tokenizer_train.__main__ import main
from tokenizer_train.evaluate.metrics import accuracy_counts, epe_px_counts, noncenter_counts

sys.path.insert(0, str(Path(__file__).parent))
from harness import TINY, train_one_thread  # noqa: E402
from loader_fixtures import write_build  # noqa: E402

W = 15
C = center_class(W)


def reference_sweep(logits, labels, velocities, mask, offsets, W):
    """The straightforward sweep: shift the centre logit, take argmax and softmax anew per offset."""
    c, m = center_class(W), mask.bool()
    out = torch.zeros(len(offsets), 5, dtype=torch.float64)
    for i, b in enumerate(offsets):
        g = logits.clone()
        g[..., c] += b
        pred = g.argmax(-1)
        out[i] = torch.tensor([accuracy_counts(pred, labels, m)[0], noncenter_counts(pred, labels, m, c)[0],
                               epe_px_counts(g, velocities, m, W)[0], float(((pred == c) & m).sum()),
                               float(m.sum())], dtype=torch.float64)
    return out


def test_sweep_sums_equals_the_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, W * W, generator=g) * 2
    logits[0, 0, :, C] = logits[0, 0, :, C + 3]  # exact ties with another class ...
    logits[0, 0, :, C + 3] += 10  # ... that is the best other class
    logits[0, 0, :3, C] = logits[0, 0, :3, C + 3]  # centre ties the best class after it
    logits[0, 1, :, C - 2] = 50.0
    logits[0, 1, :, C] = 49.5  # the best class before the centre ties it at offset 0.5
    labels = torch.randint(0, W * W, (3, 4, 6), generator=g)
    labels[1] = C
    mask = torch.rand(3, 4, 6, generator=g) > 0.2
    vel = torch.rand(3, 4, 6, 2, generator=g) * 2 - 1
    offsets = [-3.0, -0.5, 0.0, 0.5, 1.0, 2.5, 20.0]
    got = F.sweep_sums(logits, labels, vel, mask, offsets, W)
    ref = reference_sweep(logits, labels, vel, mask, offsets, W)
    assert torch.equal(got[:, [0, 1, 3, 4]], ref[:, [0, 1, 3, 4]])  # counts: exact, ties included
    assert torch.allclose(got[:, 2], ref[:, 2], rtol=1e-5)


def test_sweep_counts_hand_computed():
    # 4 labelled point steps: centre, centre, right (+1 px), left (-1 px); one unmasked
    right, left = C + 1, C - 1
    labels = torch.tensor([[[C, C, right, left, right]]])
    mask = torch.tensor([[[True, True, True, True, False]]])
    vel = torch.zeros(1, 1, 5, 2)
    vel[0, 0, 2, 0], vel[0, 0, 3, 0], vel[0, 0, 4, 0] = 1 / 7, -1 / 7, 1 / 7
    logits = torch.zeros(1, 1, 5, W * W)
    # point 0: centre by 2; point 1: right by 1 (wrong); point 2: right by 0.5; point 3: right by 3 (wrong)
    logits[0, 0, 0, C] = 2.0
    logits[0, 0, 1, right] = 1.0
    logits[0, 0, 2, right] = 0.5
    logits[0, 0, 3, right] = 3.0
    s = F.sweep_sums(logits, labels, vel, mask, [0.0, 0.75, 10.0], W)
    assert s[:, 4].tolist() == [4, 4, 4]
    # offset 0: correct = points 0, 2; non-centre correct = point 2; centre predictions = point 0
    assert s[0, :2].tolist() == [2, 1] and s[0, 3] == 1
    # offset 0.75: point 2 flips to centre (0.75 > 0.5), point 1 stays right (1 > 0.75)
    assert s[1, :2].tolist() == [1, 0] and s[1, 3] == 2
    # offset 10: everything centre -> accuracy = centre share, non-centre 0
    assert s[2, :2].tolist() == [2, 0] and s[2, 3] == 4
    # offset 0 agrees with the training metrics exactly
    assert s[0, 0] == accuracy_counts(logits, labels, mask)[0]
    assert s[0, 1] == noncenter_counts(logits, labels, mask, C)[0]
    assert s[0, 2] == pytest.approx(epe_px_counts(logits, vel, mask, W)[0])


def test_summarize_picks_best_noncentre_within_tolerance():
    table = [{"offset": -1.0, "acc": 0.40, "acc_noncenter": 0.40},
             {"offset": 0.0, "acc": 0.56, "acc_noncenter": 0.20},
             {"offset": 1.0, "acc": 0.60, "acc_noncenter": 0.05}]
    s = F.summarize(table, centre_share=0.57, tol=0.02)
    assert s["best_noncenter_within_tol"] == 0.20 and s["best_offset"] == 0.0
    s = F.summarize(table, centre_share=0.70, tol=0.02)
    assert s["best_noncenter_within_tol"] is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    build = write_build(tmp_path_factory.mktemp("build"), shard_sizes=(6, 6), sources=["v/a.h5", "v/b.h5"])
    run = train_one_thread(TINY + ["model.hidden_dim=32"], build, tmp_path_factory.mktemp("run"))
    return build, run


def test_cli_offset_zero_reproduces_logged_validation_metrics(trained, tmp_path, capsys):
    build, run = trained
    out = tmp_path / "fr.json"
    # the training batch size: the same validation batches, so code information (which mixes
    # each clip with the others of its batch) is the logged one too
    rc = main(["frontier", "--run", str(run), "--data", str(build), "--offsets=-1,1,20", "--device", "cpu",
               "--json", str(out), "--no-progress", "--batch-size", "4"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["offset"] for r in res["table"]] == [-1.0, 0.0, 1.0, 20.0]  # 0 always included
    at0 = res["table"][1]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in last if "val/acc_epoch" in r][-1]
    assert at0["acc"] == pytest.approx(val["val/acc_epoch"], abs=1e-6)
    assert at0["acc_noncenter"] == pytest.approx(val["val/acc_noncenter_epoch"], abs=1e-6)
    assert at0["epe_px"] == pytest.approx(val["val/epe_px_epoch"], rel=1e-4)
    # the unshifted model's quality figures are the trainer's validation figures (evaluation mask)
    for k in ("code_info_bits", "ce_bits", "auc_moving", "epe_zero_px"):
        assert res["summary"][k] == pytest.approx(val[f"val/{k}_epoch"], rel=1e-4, abs=1e-6), k
    assert "evaluation mask" in res["mask"]
    shares = [r["centre_pred_share"] for r in res["table"]]
    assert shares == sorted(shares)  # a larger centre offset never predicts the centre less often
    big = res["table"][-1]
    assert big["centre_pred_share"] == 1.0 and big["acc_noncenter"] == 0.0
    assert big["acc"] == pytest.approx(res["summary"]["all_centre_acc"])
    printed = capsys.readouterr().out
    assert "all-centre accuracy" in printed and "code information" in printed


def test_cli_errors_name_the_problem(trained, tmp_path, capsys):
    build, run = trained
    assert main(["frontier", "--run", str(tmp_path / "nope"), "--data", str(build)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["frontier", "--run", str(run), "--data", str(build), "--offsets", "a:b"]) == 2
    assert "offset range" in capsys.readouterr().err
    other = write_build(tmp_path / "other", shard_sizes=(4,), sources=["v/x.h5"], n_points=5)
    assert main(["frontier", "--run", str(run), "--data", str(other), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "N=5" in err


def test_one_pass_frontier_equals_the_reference_on_a_run(trained):
    """The frontier of a trained run equals shifting the logits per offset, batch by batch."""
    from motion_data.read.loader import LoaderOptions, make_loader
    from tokenizer_train.model.checkpoint import load_model
    from tokenizer_train.model.model_inputs import model_kwargs

    build, run = trained
    offsets = [-2.0, -0.5, 0.0, 0.5, 3.0]
    res = F.frontier(run, build, offsets, batch_size=4, progress=False)
    model, cfg, meta = load_model(run, "last")
    loader = make_loader(build, LoaderOptions(batch_size=4, seed=cfg.training.seed), split="val",
                         static_filter=cfg.data.static_filter, val_split=cfg.data.val_split)
    loader.set_epoch(0)
    ref = torch.zeros(len(offsets), 5, dtype=torch.float64)
    n_nc = 0.0
    with torch.no_grad():
        for b in loader:
            logits = model(b["velocities"], **model_kwargs(b))["logits"].float()
            m = b["eval_mask"].bool()
            ref += reference_sweep(logits, b["labels"], b["velocities"], m, offsets, meta["W"])
            n_nc += float((m & (b["labels"] != center_class(meta["W"]))).sum())
    want = F.table_from_counts(offsets, ref.numpy(), n_nc)
    assert res["labels"] == int(ref[0, 4]) > 0
    for got, exp in zip(res["table"], want):
        assert got == pytest.approx(exp, rel=1e-5, abs=1e-9)


def test_missing_build_is_one_line(trained, tmp_path, capsys):
    build, run = trained
    assert main(["frontier", "--run", str(run), "--data", str(tmp_path / "nobuild"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'nobuild'}: no such build folder" in err and "--data" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["frontier", "--run", str(run), "--data", str(empty), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and len(err.strip().splitlines()) == 1
