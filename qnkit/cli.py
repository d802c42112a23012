"""The `qnkit` command line: one Typer app; each command lives in qnkit/commands/<name>.py.

Heavy imports (torch, onnxruntime) happen inside the commands, so `qnkit --help` stays fast and
torch-free. Bad input (QnkitInputError, click usage errors) ends with one line on stderr and
exit code 2; any other failure with one line and exit code 1 (QNKIT_DEBUG=1 shows the traceback).
An optional package that a command turns out to need (torch for `qnkit evaluate`, say) is bad input
too: one line naming the extra that installs it, exit code 2.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer

from qnkit.errors import QnkitInputError, extra_providing, missing_dependency

COMMANDS = ("synth", "train", "evaluate", "export", "verify", "segment", "models", "listen", "bench", "demo")

app = typer.Typer(
    name="qnkit",
    help="Train QuickNAT for kidney segmentation in CT, export it to ONNX/TensorRT, and segment fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Train QuickNAT for kidney segmentation in CT, export it to ONNX/TensorRT, and segment fast."""


def _register() -> None:
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"qnkit.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qnkit.commands.{name}":
                continue  # command not built yet
            raise
        app.command(name)(module.command)


_register()


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
