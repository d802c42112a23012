"""The `qnkit` command line: one Typer app; each command lives in qnkit/commands/<name>.py.

Heavy imports (torch, onnxruntime) happen inside the commands, so `qnkit --help` stays fast and
torch-free. Bad input (QnkitInputError, click usage errors) ends with one line on stderr and
exit code 2; any other failure with one line and exit code 1 (QNKIT_DEBUG=1 shows the traceback).
An optional package that a command turns out to need (torch for `qnkit evaluate`, say) is bad input
too: one line naming the extra that installs it, exit code 2.

Help is Click's plain layout (``rich_markup_mode=None``): it wraps at the terminal's width, so every
command's help reads at 80 columns; Typer's rich panels squeeze the help column and cut words with "…".
A command whose module cannot be imported is listed as unavailable and, when run, says why (exit 1),
instead of vanishing from the command list.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer

from qnkit.errors import QnkitInputError, extra_providing, missing_dependency

COMMANDS = ("synth", "train", "evaluate", "export", "verify", "segment", "models", "listen", "bench", "demo")

#: One line per command for `qnkit --help` (each fits 80 columns; a command's own --help says more).
SHORT_HELP = {
    "synth": "Write synthetic CT cases in the KiTS19 layout.",
    "train": "Train QuickNAT on a KiTS19-layout folder.",
    "evaluate": "Dice per test volume of a trained run.",
    "export": "Export a run's checkpoint into a verified model bundle.",
    "verify": "Check a model bundle's hashes and print what was checked.",
    "segment": "Segment both kidneys in CT (NIfTI or DICOM).",
    "models": "List the shipped models and how they were validated.",
    "listen": "A DICOM node: segment the CT series a PACS sends.",
    "bench": "Benchmark kernels, I/O, backends and segment end to end.",
    "demo": "Synth, train, export, segment and bench, on this machine.",
}

HELP = "Train QuickNAT for kidney segmentation in CT, export it to ONNX/TensorRT, and segment fast."


def make_app() -> typer.Typer:
    """The `qnkit` app with every command of :data:`COMMANDS` (or its stand-in, when its module fails)."""
    app = typer.Typer(
        name="qnkit",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )

    @app.callback()
    def _root() -> None:
        """Train QuickNAT for kidney segmentation in CT, export it to ONNX/TensorRT, and segment fast."""

    for name in COMMANDS:
        try:
            module = importlib.import_module(f"qnkit.commands.{name}")
        except Exception as exc:  # noqa: BLE001 - a broken command is reported, never hidden
            _add_unavailable(app, name, exc)
            continue
        app.command(name, short_help=SHORT_HELP.get(name))(module.command)
    return app


def _add_unavailable(app: typer.Typer, name: str, exc: Exception) -> None:
    """Register ``name`` as a command that fails with why its module could not be imported.

    It stays in `qnkit --help` (marked unavailable) and accepts any arguments, so that running it
    names the import error instead of a usage error; a missing optional package names its extra.
    """
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing and extra_providing(missing):  # bad input: exit code 2, as for any missing extra
        message, code = str(missing_dependency(f"qnkit {name}", missing)), 2
    else:  # a broken install: exit code 1
        why = " ".join(str(exc).split()) or type(exc).__name__
        message, code = (f"qnkit {name} is unavailable: importing qnkit.commands.{name} failed "
                         f"({type(exc).__name__}: {why}); reinstall qnkit"), 1

    def unavailable(ctx: typer.Context) -> None:
        fail(message, code)

    unavailable.__doc__ = f"Unavailable here: {message}"
    app.command(name, short_help="unavailable here (run it to see why)", add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(unavailable)


app = make_app()


# Click's exception classes, whether Typer uses click itself or (Typer >= 0.22) its own copy of it.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def fail(message: str, code: int = 2) -> None:
    """Print `qnkit: error: message` on stderr and exit."""
    print(f"qnkit: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["segment"]:  # `--ray [ADDRESS]`: an option whose value is optional
        from qnkit.commands.segment import ray_address_argv

        args = ray_address_argv(args)
    try:
        # Not standalone: usage errors come here instead of Typer's boxed multi-line panel.
        code = app(args=args, prog_name="qnkit", standalone_mode=False)
    except _UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `qnkit`: the help, as in standalone mode
            exc.show()
            raise SystemExit(exc.exit_code) from None
        fail(_usage_line(exc), 2)
    except _ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except typer.Abort:  # how non-standalone Click reports Ctrl-C
        fail("interrupted", 130)
    except QnkitInputError as exc:
        fail(str(exc), 2)
    except ModuleNotFoundError as exc:  # an optional package a command imported late: name its extra
        if exc.name and extra_providing(exc.name):
            fail(str(missing_dependency(f"qnkit {args[0]}" if args else "qnkit", exc.name)), 2)
        if os.environ.get("QNKIT_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc} (set QNKIT_DEBUG=1 for the traceback)", 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unless asked
        if os.environ.get("QNKIT_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc} (set QNKIT_DEBUG=1 for the traceback)", 1)
    raise SystemExit(code if isinstance(code, int) else 0)  # as standalone mode: typer.Exit(code) or 0


def _usage_line(exc: Exception) -> str:
    """`segment: Invalid value for '--z-step': ... (qnkit segment -h)`: the message and where to look."""
    where = exc.ctx.command_path if exc.ctx is not None else "qnkit"
    command = where.split(" ", 1)[1] + ": " if " " in where else ""
    return f"{command}{exc.format_message()} (see '{where} -h')"
