"""The command line's contract for bad usage: one line on stderr, `qnkit: error: ...`, exit code 2.

Typer's standalone mode would print a boxed, multi-line panel for these; `qnkit.cli.main` turns every
usage error (unknown command or option, missing argument, out-of-range value) into qnkit's one line.
Runs in-process (SystemExit carries the exit code); none of these commands imports torch.
"""
import pytest


@pytest.fixture
def run_qnkit(capsys):
    from qnkit.cli import main

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


@pytest.mark.parametrize("args, words", [
    (("segment", "ct.nii.gz", "--z-step", "-1"), ("segment:", "--z-step", "qnkit segment -h")),
    (("segment",), ("segment:", "Missing argument", "INPUT")),
    (("segment", "ct.nii.gz", "--no-such-option"), ("segment:", "--no-such-option")),
    (("train", "--epochs", "many"), ("train:", "--epochs")),
    (("no-such-command",), ("no-such-command", "qnkit -h")),
])
def test_usage_errors_are_one_line_and_exit_2(run_qnkit, args, words):
    code, out, err = run_qnkit(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qnkit: error: "), err
    assert all(word in lines[0] for word in words), lines[0]
    assert "╭" not in err and "Traceback" not in err and out == ""


def test_help_and_a_good_command_exit_0(run_qnkit):
    code, out, _ = run_qnkit("segment", "--help")
    assert code == 0 and "--z-step" in out
    code, out, _ = run_qnkit("models")
    assert code == 0 and "kidney-synth" in out


def test_bare_qnkit_shows_the_help_with_exit_2(run_qnkit):
    code, out, err = run_qnkit()
    assert code == 2 and "Usage" in out + err and "segment" in out + err


def test_a_command_exit_code_passes_through(run_qnkit, tmp_path):
    """Two unreadable inputs: `qnkit segment` reports each and ends with its own typer.Exit(2)."""
    inputs = []
    for name in ("a", "b"):
        inputs.append(tmp_path / f"{name}.nii.gz")
        inputs[-1].write_bytes(b"not a nifti file")
    code, _, err = run_qnkit("segment", *map(str, inputs), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "2 of 2 case(s) failed" in err
