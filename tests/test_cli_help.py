"""The preprocess commands' --help is plain text, and error messages name flags the parser takes."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import make_tracks
from preprocess.__main__ import COMMANDS, main


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_is_plain_text(capsys, cmd):
    text = help_text(capsys, *([cmd] if cmd else []))
    assert "`" not in text, text  # no RST markup
    assert not re.search(r"\bthe seed\b|\bseed's\b", text), text  # an unexplained name for the plan


@pytest.mark.parametrize("cmd", ["analyze", "tune-filter"])
def test_the_positional_argument_is_the_build(capsys, cmd):
    text = help_text(capsys, cmd)
    usage = text.split("\n\n")[0]
    assert usage.split()[-1] == "BUILD" and "OUT" not in usage and "\n  BUILD " in text


def test_image_size_message_names_the_form_the_parser_takes(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "t.npy", make_tracks(B=1, T=20)[0][0])  # bare tracks: no frame size stored
    assert main(["build-shards", "--input", str(d), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    m = re.search(r"--image-size (\S+) \(e\.g\. (\S+)\)", err)
    assert m, err
    assert m.group(1) == "H,W" and "--image-size H,W" in help_text(capsys, "build-shards")
    # the example, as the message writes it, is accepted
    assert main(["build-shards", "--input", str(d), "--out", str(tmp_path / "b"), "--image-size", m.group(2),
                 "--no-progress"]) == 0
