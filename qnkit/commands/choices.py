"""Option values the command line checks while it parses, before any work starts.

A fixed set of values is an enum (Typer lists it in `--help` as ``<auto|cpu|cuda>`` and refuses anything
else as a usage error: one line, exit code 2); :func:`plain` turns the member Typer hands over back into
its string, so the code behind an option sees the same values as before. A value with a pattern (a
CUDA device number) has its own callback. Nothing here imports numpy or a backend: every command
module is imported for `qnkit --help`.
"""
from __future__ import annotations

import enum
import re

import typer

#: `--backend` values: qnkit.backends.AVAILABLE_KINDS (tests/test_cli.py checks that the two agree).
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
#: `--precision` values: "auto" and qnkit.backends.PRECISIONS (checked likewise).
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str-valued enum whose members are ``values`` (Typer shows and checks them)."""
    return enum.Enum(name, [(v, v) for v in values], type=str)


Backend = choices("Backend", BACKENDS)
Precision = choices("Precision", PRECISIONS)
Checkpoint = choices("Checkpoint", ("best", "last"))
TorchDevice = choices("TorchDevice", ("cpu", "cuda"))
TrainDevice = choices("TrainDevice", ("auto", "cpu", "cuda"))
Schedule = choices("Schedule", ("step", "poly"))
Kidneys = choices("Kidneys", ("both", "left", "right"))
Generator = choices("Generator", ("classic", "anatomy"))
ClassWeights = choices("ClassWeights", ("median_frequency", "none"))


def plain(value):
    """An option's enum member as its string (None and strings pass through)."""
    return value.value if isinstance(value, enum.Enum) else value


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device(value: str | None) -> str | None:
    """`--device` of an inference command: auto, cpu, cuda or cuda:N; anything else (tpu, gpu, cuda:x)
    is a usage error while parsing, before the CT loads."""
    if value is None or _DEVICE.fullmatch(value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
