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
