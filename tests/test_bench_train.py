"""benchmarks/bench_train.py stays runnable: a tiny CPU run prints both paths and their ratio."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_tiny_cpu_prints_both_paths_and_ratios(capsys, tiny_build):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--data", str(tiny_build), "--configs", "base+filter", "--max-steps", "3", "--set",
              "model.hidden_dim=16", "model.num_layers=1", "model.num_heads=2", "training.batch_size=8",
              "data.val_split=0.3", "data.num_workers=0"])
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[1]: ln.split()[2:] for ln in lines if ln.startswith("base+filter")}
    assert set(rows) == {"all", "masked", "ratio"}
    for path in ("all", "masked"):
        train_cps, val_cps, act_mb, peak = map(float, rows[path][:4])
        assert train_cps > 0 and val_cps > 0 and act_mb > 0 and 0.1 < peak < 20
    # the masked path keeps fewer bytes for backward: the filter keeps a small share of points
    act_ratio = float(rows["ratio"][2].rstrip("x"))
    assert 0 < act_ratio < 1
    assert lines[-1].startswith("total ")
