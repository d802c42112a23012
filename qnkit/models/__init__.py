"""Models that ship with qnkit: bundles as package data, and a small registry of what each one is.

Each shipped model is a bundle folder ``qnkit/models/<name>/`` (what ``qnkit export`` writes,
hash-checked like any bundle) plus an entry in ``registry.json`` beside this file: what it was
trained on, how to rebuild it (the recipe), and what it was validated on with which figures.
The bundle's own ``qnkit.json`` records its domain (pixel spacing, slice thickness, HU window,
training data); the registry adds what was measured after export, such as the Dice on a real
CT, which a bundle cannot sign for itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qnkit.errors import QnkitInputError

MODELS_DIR = Path(__file__).resolve().parent
REGISTRY = MODELS_DIR / "registry.json"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    path: Path
    entry: dict

    @property
    def default(self) -> bool:
        return bool(self.entry.get("default", False))


def _registry() -> dict:
    try:
        data = json.loads(REGISTRY.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"models": {}}
    except (OSError, ValueError) as exc:
        raise QnkitInputError(f"{REGISTRY}: unreadable model registry ({exc}); reinstall qnkit") from None
    return data if isinstance(data, dict) else {"models": {}}


def shipped_models() -> list[ShippedModel]:
    """Every registered model whose bundle folder is installed."""
    out = []
    for name, entry in sorted(_registry().get("models", {}).items()):
        path = MODELS_DIR / name
        if (path / "qnkit.json").is_file():
            out.append(ShippedModel(name, path, entry))
    return out


def find_model(name: str | None = None) -> ShippedModel:
    """The shipped model called `name`, or the default one; a clear error when there is none."""
    models = shipped_models()
    if name is None:
        for model in models:
            if model.default:
                return model
        if models:
            return models[0]
        raise QnkitInputError("no shipped model is installed with this qnkit; pass --model BUNDLE_DIR "
                              "(create one with `qnkit train` and `qnkit export`)")
    for model in models:
        if model.name == name:
            return model
    have = ", ".join(m.name for m in models) or "none"
    raise QnkitInputError(f"no shipped model called {name!r} (installed: {have})")


def resolve_model(model: str | Path | None) -> Path:
    """A bundle folder for ``--model``: a path to a bundle, a shipped model's name, or None for the default."""
    if model is None:
        return find_model().path
    path = Path(model)
    if path.is_dir() or any(sep in str(model) for sep in ("/", "\\")) or str(model).startswith("."):
        return path
    return find_model(str(model)).path
