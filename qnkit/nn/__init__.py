"""QuickNAT network (needs torch; not imported by ``import qnkit``).

``qnkit.nn.config`` (the hyper-parameters) imports no torch, so the training settings can use it
without torch; the names below load their modules on first use.
"""
import importlib

_HOMES = {"QuickNAT": "quicknat", "QuickNATConfig": "config", "WithSigmoid": "quicknat",
          "mask_unpool2d": "unpool", "window_max": "unpool"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
