"""The command dispatcher: a user's error is one line (exit 2); an interrupt is one line too."""
import signal

import pytest

from motion_data.common.errors import UserError
from tokenizer_train.experiments import ablate
from tokenizer_train.__main__ import main
from tokenizer_train.common.stop import Stopped


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


def test_user_errors_of_every_preprocess_command_share_one_format_and_exit_2(tmp_path, capsys):
    from preprocess.__main__ import main as pre

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["build-shards", "--input", str(empty), "--out", str(tmp_path / "b"), "--no-progress"], "build-shards"),
        (["track-video", str(tmp_path / "missing.avi"), "--out", str(tmp_path / "t"), "--no-progress"], "track-video"),
        (["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")], "merge"),
        (["analyze", str(tmp_path / "nothing")], "analyze"),
    ]
    for argv, name in cases:
        assert pre(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"python -m preprocess {name}: error: ") and "\n" not in err, err
    pre(cases[0][0])
    err = capsys.readouterr().err
    assert "no input files found" in err and ".npz" in err and ".h5" in err  # names what it looked for


def test_an_unknown_option_shows_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m tokenizer_train train" in err and "unrecognized arguments: --epochs 1" in err
