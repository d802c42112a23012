"""Errors that the CLI turns into one line on stderr and exit code 2, and the check that an optional
feature's packages are installed before any work starts (:func:`require`)."""
from __future__ import annotations


class QnkitInputError(ValueError):
    """Bad input from the user: a file, a folder, a setting or an argument that cannot be used."""


class MissingDependency(QnkitInputError):
    """An optional feature's package is not installed; the message names the qnkit extra that installs it."""


def installed(module: str) -> bool:
    """True when ``module`` can be imported (found on the path; nothing is imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry in sys.modules
        return False


def extra_providing(module: str) -> str | None:
    """The qnkit extra (``train``, ``plot``, ``dicom``, ...) whose requirements install ``module``, read from
    qnkit's own package metadata so that it cannot drift from pyproject.toml; None when no extra does (or
    qnkit is not installed). The catch-all ``dev`` extra, and ``gpu`` (a GPU server's CUDA stack), are named
    only when nothing else installs it: torch on a CPU machine comes with ``train``, not with ``gpu``."""
    import importlib.metadata as md
    import re

    try:
        requirements = md.requires("qnkit") or []
    except md.PackageNotFoundError:
        return None
    wanted = module.split(".")[0].lower().replace("-", "_")
    if wanted == "qnkit":  # a part of qnkit itself is missing: a broken install, not a missing extra
        return None
    extras = []
    for line in requirements:
        found = re.match(r"\s*([A-Za-z0-9_.\-]+).*?extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if found and found.group(1).lower().replace("-", "_") == wanted:
            extras.append(found.group(2))
    return next((e for e in extras if e not in ("dev", "gpu")), extras[0] if extras else None)


def install_hint(module: str, extra: str | None = None) -> str:
    """``pip install "qnkit[plot]"`` for the extra that installs ``module`` (else ``pip install module``)."""
    extra = extra or extra_providing(module)
    return f'pip install "qnkit[{extra}]"' if extra else f"pip install {module.split('.')[0]}"


def missing_dependency(feature: str, module: str, extra: str | None = None) -> MissingDependency:
    """The one-line error for ``feature`` needing the absent ``module``."""
    return MissingDependency(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                             f"{install_hint(module, extra)}")


def require(feature: str, *modules: str, extra: str | None = None) -> None:
    """Raise :class:`MissingDependency` for the first of ``modules`` that is not installed.

    Called before any work (loading a CT, training, exporting), so that an optional feature without its
    package fails at once, in one line naming the extra to install, and never after the slow part.
    """
    for module in modules:
        if not installed(module):
            raise missing_dependency(feature, module, extra)
