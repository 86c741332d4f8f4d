"""benchmarks/bench_peer.py: the shared scorer on a project run (AMPLIFY's source tree is not
part of this repository, so its rows are run by hand: docs/results.md), and its refusal of a
folder that is not an AMPLIFY checkout."""
import importlib.util
from pathlib import Path

import pytest

from tokenizer_train.common.config import from_dict
from tokenizer_train.train.trainer import train

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"
TINY = ["model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8",
        "data.val_split=0.3", "training.epochs=1"]


def _mod():
    spec = importlib.util.spec_from_file_location("bench_peer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_project_run_is_scored_like_the_trainer_scores_it(tiny_build, tmp_path, capsys):
    run = tmp_path / "run"
    last = train(from_dict({}, TINY), tiny_build, run, progress=False)
    res = _mod().main(["--data", str(tiny_build), "--set", *TINY, "--rows", f"run:{run}"])
    assert len(res) == 1
    r = res[0]
    # best.pt of a 1-epoch run is its last epoch: the trainer's own validation figures
    for k in ("code_info_bits", "ce_bits", "acc_noncenter", "epe_px", "epe_zero_px", "auc_moving"):
        assert r[k] == pytest.approx(last[f"val/{k}_epoch"], rel=1e-4, abs=1e-6), k
    assert 0.0 <= r["false_motion_share"] <= 1.0 and r["epe_px_all_valid"] > 0 and r["codes_used"] >= 1
    assert f"run:{run}" in capsys.readouterr().out.splitlines()[-1]


def test_a_folder_that_is_not_amplify_is_refused_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="not an AMPLIFY source tree"):
        _mod().Amplify(tmp_path)
