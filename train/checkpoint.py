"""Checkpoints that load safely and say what they are.

RUN_DIR/checkpoints/<kind>/ with kind = last | best:
- model.safetensors: the network weights (no pickle);
- meta.json: format, epoch, metrics, settings, network config, preprocessing parameters and the
  sha256 of every file beside it, so a mismatched or truncated file is detected, not guessed;
- state.pt (last only): optimiser, scheduler, grad scaler, RNG states and loop state (epoch,
  early stopping, best metric), plain tensors/dicts written with torch.save and read back with
  torch.load(weights_only=True).
A checkpoint is written into a temporary folder and swapped in with renames, so a kill at any
moment leaves either the previous or the new checkpoint (found again via `<kind>.old`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qnkit.errors import QnkitInputError

FORMAT = "qnkit-quicknat-checkpoint"
VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as plain tensors and lists."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "mt": list(mt), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, kind: str, model: torch.nn.Module, meta: dict, state: dict | None = None) -> Path:
    """Write checkpoints/<kind>/ atomically; `model` is the bare network (not the DDP wrapper)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{kind}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        files = {"model.safetensors": _sha256(tmp / "model.safetensors")}
        if state is not None:
            torch.save(state, tmp / "state.pt")
            files["state.pt"] = _sha256(tmp / "state.pt")
        full = {"format": FORMAT, "version": VERSION, "kind": kind, **meta, "files": files}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1))
        final, old = root / kind, root / f"{kind}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def locate(run_dir: Path, kind: str) -> Path:
    """checkpoints/<kind>, or <kind>.old if a swap was interrupted."""
    root = Path(run_dir) / "checkpoints"
    for folder in (root / kind, root / f"{kind}.old"):
        if (folder / "meta.json").is_file():
            return folder
    raise QnkitInputError(f"{run_dir}: no '{kind}' checkpoint (expected {root / kind}/meta.json)")


def read_meta(folder: Path, verify: bool = True) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise QnkitInputError(f"{folder}/meta.json: unreadable checkpoint metadata ({exc})") from None
    if meta.get("format") != FORMAT:
        raise QnkitInputError(f"{folder}: not a qnkit checkpoint (format {meta.get('format')!r})")
    if verify:
        for name, digest in meta.get("files", {}).items():
            if not (folder / name).is_file() or _sha256(folder / name) != digest:
                raise QnkitInputError(f"{folder / name}: missing or does not match the sha256 in meta.json")
    return meta


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"))


def load_state(folder: Path) -> dict:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)


def build_model(network: dict) -> torch.nn.Module:
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    return QuickNAT(QuickNATConfig.from_dict(dict(network)))


def load_model(run_dir: Path, kind: str = "best") -> tuple[torch.nn.Module, dict]:
    """(network in eval mode on the CPU, checkpoint metadata) from RUN_DIR/checkpoints/<kind>."""
    folder = locate(run_dir, kind)
    meta = read_meta(folder)
    model = build_model(meta["network"])
    load_weights(folder, model)
    return model.eval(), meta
