"""The command dispatcher: a user's error is one line (exit 2); an interrupt is one line too."""
import signal

from motion_data.errors import UserError
from tokenizer_train import ablate
from tokenizer_train.__main__ import main
from tokenizer_train.stop import Stopped


def _run(monkeypatch, capsys, exc):
    def boom(args):
        raise exc
    monkeypatch.setattr(ablate, "run", boom)
    rc = main(["ablate", "--data", "d", "--out", "o"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return rc, err


def test_user_error_is_one_line_exit_2(monkeypatch, capsys):
    rc, err = _run(monkeypatch, capsys, UserError("/x/build: not found; pass --data BUILD"))
    assert rc == 2 and "ablate: error: /x/build: not found" in err


def test_a_signal_stopped_training_inside_another_command_says_where_it_saved(monkeypatch, capsys, tmp_path):
    rc, err = _run(monkeypatch, capsys, Stopped(signal.SIGTERM, 7, tmp_path / "run"))
    assert rc == 128 + signal.SIGTERM
    assert "interrupted: stopped by SIGTERM at step 7" in err and f"--resume {tmp_path / 'run'}" in err


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    rc, err = _run(monkeypatch, capsys, KeyboardInterrupt())
    assert rc == 130 and err.strip().endswith("ablate: interrupted")


def test_ablate_stopped_by_a_signal_says_to_rerun_the_sweep(monkeypatch, capsys, tmp_path):
    # the run in progress saved; re-running the same ablate command finishes the sweep
    def stopped(*a, **k):
        raise Stopped(signal.SIGTERM, 3, tmp_path / "runs" / "baseline" / "seed0")
    monkeypatch.setattr(ablate, "ablate", stopped)
    (tmp_path / "build").mkdir()
    rc = main(["ablate", "--data", str(tmp_path / "build"), "--out", str(tmp_path / "ab")])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and len(err.strip().splitlines()) == 1
    assert "stopped by SIGTERM at step 3" in err and "run the same ablate command again" in err
    assert "train --resume" not in err
