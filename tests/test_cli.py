"""The command line's contract for bad usage: one line on stderr, `qnkit: error: ...`, exit code 2.

Typer's standalone mode would print a boxed, multi-line panel for these; `qnkit.cli.main` turns every
usage error (unknown command or option, missing argument, out-of-range value) into qnkit's one line.
Runs in-process (SystemExit carries the exit code); none of these commands imports torch.
The rest: help that reads at 80 columns, option values checked while parsing (before any CT is read),
optional features that check their package first and name the extra, and a command whose module fails
to import, reported rather than hidden.
"""
import os
import subprocess
import sys

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


# --- help that reads at 80 columns ------------------------------------------------------------------------


def _help(*args, columns=80):
    from typer.testing import CliRunner

    from qnkit import cli

    result = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": str(columns)}, prog_name="qnkit")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", "synth", "train", "evaluate", "export", "verify", "segment", "models",
                                     "listen", "bench", "demo"])
def test_every_help_reads_at_80_columns(command):
    """No help line wider than 80 columns and no help text cut: neither Rich's "…" (which cut segment's
    default output name mid-word) nor Click's "..." after a command's one-line summary."""
    from qnkit import cli

    text = _help(*([command] if command else []))
    assert "…" not in text and "╭" not in text
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, wide
    if not command:
        listing = text.split("Commands:", 1)[1].splitlines()
        for name in cli.COMMANDS:
            (line,) = [line for line in listing if line.split()[:1] == [name]]
            assert not line.rstrip().endswith("..."), line
    if command == "segment":
        assert "<input stem>_kidneys.nii.gz" in text and "--device auto|cpu|cuda[:N]" in text
        assert "<auto|torch|onnxruntime|tensorrt>" in " ".join(text.split())


# --- choices checked while parsing, before the CT loads ----------------------------------------------------


def test_choice_lists_match_the_backends():
    """The CLI's --backend/--precision choices are the backends' own (without importing them for --help)."""
    from qnkit import backends
    from qnkit.commands import choices

    assert choices.BACKENDS == backends.AVAILABLE_KINDS
    assert choices.PRECISIONS == ("auto", *backends.PRECISIONS)


@pytest.fixture
def garbage_ct(tmp_path):
    """A file named like a CT whose bytes are no NIfTI: any check made after loading it would fail on the
    file instead, so an error about an option proves that the option was checked first."""
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"not a nifti file")
    return path


@pytest.mark.parametrize("args, words", [
    (("--device", "tpu"), ("--device", "tpu")),
    (("--device", "cuda:x"), ("--device",)),
    (("--backend", "tensorflow"), ("--backend", "tensorflow")),
    (("--precision", "fp64"), ("--precision", "fp64")),
    (("--backend", "tensorrt", "--device", "cpu"), ("tensorrt", "GPU only")),
    (("--backend", "onnxruntime", "--precision", "bf16"), ("onnxruntime", "bf16")),
    (("--backend", "tensorrt", "--precision", "int8", "--device", "cuda"), ("tensorrt", "int8")),
])
def test_bad_backend_choices_fail_before_the_ct_loads(run_qnkit, garbage_ct, args, words):
    code, out, err = run_qnkit("segment", str(garbage_ct), "--no-progress", *args)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qnkit: error: "), err
    assert all(word in lines[0] for word in words) and "NIfTI" not in lines[0], lines[0]
    assert out == "" and not list(garbage_ct.parent.glob("*_kidneys*"))


def test_cuda_where_no_gpu_is_visible_is_refused_not_run_on_the_cpu(run_qnkit, garbage_ct, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what qnkit.backends.nvidia_gpu_present honours
    code, _, err = run_qnkit("segment", str(garbage_ct), "--device", "cuda:1")
    assert code == 2 and err.count("\n") == 1 and "no NVIDIA GPU" in err and "--device cuda:1" in err


@pytest.mark.parametrize("command, args, words", [
    ("train", ("--device", "tpu"), ("train:", "--device", "tpu")),
    ("train", ("--schedule", "cosine"), ("train:", "--schedule")),
    ("evaluate", ("run", "--device", "tpu"), ("evaluate:", "--device")),
    ("export", ("run", "--out", "b", "--checkpoint", "worst"), ("export:", "--checkpoint")),
    ("synth", ("out", "--kidneys", "middle"), ("synth:", "--kidneys")),
    ("synth", ("out", "--generator", "gan"), ("synth:", "--generator")),
])
def test_other_commands_check_their_choices_while_parsing(run_qnkit, tmp_path, monkeypatch, command, args, words):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_qnkit(command, *args)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and all(word in lines[0] for word in words), err
    assert list(tmp_path.iterdir()) == []  # nothing started


# --- optional features check their package first -------------------------------------------------------------


@pytest.mark.parametrize("module, args, feature, extra", [
    ("matplotlib", ("--preview", "p.png"), "--preview", "plot"),
    ("ray", ("--ray",), "--ray", "cluster"),
    ("torch", ("--backend", "torch"), "--backend torch", "train"),
    ("tensorrt", ("--backend", "tensorrt", "--device", "cuda"), "--backend tensorrt", "gpu"),
])
def test_an_optional_feature_without_its_package_stops_first_naming_the_extra(
        run_qnkit, garbage_ct, monkeypatch, module, args, feature, extra):
    """One line naming the extra, exit code 2, before the (garbage) CT is read and nothing written."""
    monkeypatch.setitem(sys.modules, module, None)  # importlib.util.find_spec now finds nothing
    monkeypatch.chdir(garbage_ct.parent)
    code, out, err = run_qnkit("segment", str(garbage_ct), *args)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == f'qnkit: error: {feature} needs {module}, which is not installed: pip install "qnkit[{extra}]"'
    assert sorted(p.name for p in garbage_ct.parent.iterdir()) == ["ct.nii.gz"]


def test_dicom_input_without_pydicom_stops_before_any_case(run_qnkit, tmp_path, monkeypatch):
    """A batch of a NIfTI file and a DICOM folder: without pydicom nothing is segmented at all (the DICOM
    case would otherwise fail after the NIfTI one had run)."""
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(bytes(128) + b"DICM" + bytes(64))
    (tmp_path / "ct.nii.gz").write_bytes(b"not a nifti file")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    code, _, err = run_qnkit("segment", str(tmp_path / "ct.nii.gz"), str(series), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and 'pip install "qnkit[dicom]"' in err and "pydicom" in err, err
    assert list((tmp_path / "out").iterdir()) == []


def _run_without(modules, *args, cwd=None):
    """`qnkit ...` in a fresh interpreter in which ``modules`` cannot be imported (as if not installed)."""
    code = f"import sys\nfor m in {list(modules)!r}:\n    sys.modules[m] = None\nfrom qnkit.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "QNKIT_NUM_THREADS": "1"})


def test_training_commands_without_torch_name_the_extra(tmp_path):
    """`qnkit train` and `qnkit export` check first; `qnkit evaluate` imports training code, whose missing
    torch becomes the same one line (cli.main), never a raw ModuleNotFoundError."""
    run = tmp_path / "run"
    run.mkdir()
    for args, extra in ((("train", "--data", tmp_path, "--out", run), "train"),
                        (("export", run, "--out", tmp_path / "bundle"), "export"),
                        (("evaluate", run), "train")):
        proc = _run_without(["torch"], *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.splitlines() == [f'qnkit: error: qnkit {args[0]} needs torch, which is not installed: '
                                            f'pip install "qnkit[{extra}]"'], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and list(run.iterdir()) == []


# --- a command whose module fails to import is reported ---------------------------------------------------


def test_a_command_whose_module_fails_to_import_is_listed_and_says_why(run_qnkit, monkeypatch):
    from qnkit import cli

    monkeypatch.setitem(sys.modules, "qnkit.commands.listen", None)  # its import now fails
    monkeypatch.setattr(cli, "app", cli.make_app())
    code, out, _ = run_qnkit("--help")
    assert code == 0
    (line,) = [line for line in out.split("Commands:", 1)[1].splitlines() if line.split()[:1] == ["listen"]]
    assert "unavailable" in line
    code, out, err = run_qnkit("listen", "--port", "104", "--allow", "PACS")
    lines = err.splitlines()
    assert code == 1 and len(lines) == 1 and out == "", err
    assert "qnkit listen is unavailable" in lines[0] and "qnkit.commands.listen" in lines[0], lines[0]
    code, _, err = run_qnkit("segment", "--help")  # the others still work
    assert code == 0
