"""benchmarks/bench_train.py stays runnable: a tiny CPU run prints every requested row."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_tiny_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--preset", "tiny", "--device", "cpu", "--clips", "24", "--steps", "2", "--workers", "0", "auto"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    model = [ln for ln in lines if ln.startswith("model only")]
    assert len(model) == 1 and float(model[0].split()[-4]) > 0  # clips/s
    rows = {ln.split(",")[1].split()[0]: ln for ln in lines if ln.startswith("train loop,")}
    assert set(rows) == {"0", "auto"}
    assert "(= 0)" in rows["auto"]  # auto on a CPU device loads in process
    for ln in rows.values():
        cps, wait = ln.split()[-4:-2]
        assert float(cps) > 0 and 0.0 <= float(wait.rstrip("%")) <= 100.0
    assert lines[-1].startswith("total ")
    # the cap on the time: settings past --time-limit are skipped, and said so
    mod.main(["--preset", "tiny", "--device", "cpu", "--clips", "24", "--steps", "2", "--workers", "0",
              "--time-limit", "0"])
    assert "skipped: --time-limit 0 s reached" in capsys.readouterr().out
