"""Checkpoints that load safely and say what they are.

RUN_DIR/checkpoints/<kind>/ with kind = last | best:
- model.safetensors: the network weights (no pickle);
- meta.json: format, epoch, metrics, settings, network config, preprocessing parameters and the
  sha256 of every file beside it, so a mismatched or truncated file is detected, not guessed;
- state.pt (last only): optimiser, scheduler, grad scaler, RNG states and loop state (epoch,
  early stopping, best metric), plain tensors/dicts written with torch.save and read back with
  torch.load(weights_only=True).
A checkpoint is written into a temporary folder and swapped in by :func:`qnkit._atomic.swap_in_dir`
(fsync'ed, then one atomic exchange, or two renames), so a kill at any moment leaves one whole
checkpoint, the previous or the new one, that :func:`locate` finds. Loading hashes the bytes it then
parses (no hash-then-reopen gap).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from qnkit._atomic import current_or_previous, discard_temp, swap_in_dir, temp_dir
from qnkit.bundle import sha256_bytes, sha256_file
from qnkit.errors import QnkitInputError

FORMAT = "qnkit-quicknat-checkpoint"
VERSION = 1


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
    tmp = temp_dir(root / kind)
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        files = {"model.safetensors": sha256_file(tmp / "model.safetensors")}
        if state is not None:
            torch.save(state, tmp / "state.pt")
            files["state.pt"] = sha256_file(tmp / "state.pt")
        full = {"format": FORMAT, "version": VERSION, "kind": kind, **meta, "files": files}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1))
        return swap_in_dir(tmp, root / kind)
    except BaseException:
        discard_temp(tmp)
        raise


def locate(run_dir: Path, kind: str) -> Path:
    """checkpoints/<kind>, or the previous copy kept while a swap was interrupted."""
    root = Path(run_dir) / "checkpoints"
    folder = current_or_previous(root / kind, lambda f: (f / "meta.json").is_file())
    if folder is None:
        raise QnkitInputError(f"{run_dir}: no '{kind}' checkpoint (expected {root / kind}/meta.json)")
    return folder


def read_meta(folder: Path, verify: bool = True) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise QnkitInputError(f"{folder}/meta.json: unreadable checkpoint metadata ({exc})") from None
    if meta.get("format") != FORMAT:
        raise QnkitInputError(f"{folder}: not a qnkit checkpoint (format {meta.get('format')!r})")
    if verify:
        for name in meta.get("files", {}):
            _read_verified(folder, name, meta)
    return meta


def _read_verified(folder: Path, name: str, meta: dict | None = None) -> bytes:
    """The bytes of ``folder/name`` once they match the sha256 that meta.json records for them."""
    meta = meta if meta is not None else read_meta(folder, verify=False)
    digest = meta.get("files", {}).get(name)
    try:
        data = (folder / name).read_bytes()
    except OSError:
        data = None
    if digest is None or data is None or sha256_bytes(data) != digest:
        raise QnkitInputError(f"{folder / name}: missing or does not match the sha256 in meta.json")
    return data


def load_weights(folder: Path, model: torch.nn.Module, *, inflate: bool = False,
                 widen_from: int | None = None) -> None:
    """The checkpoint's weights into `model`; with `inflate`, a one-plane (2-D) checkpoint's weights into a
    2.5-D QuickNAT of the same network (:func:`qnkit.nn.quicknat.inflate_input_planes`: the same output); with
    `widen_from`, a checkpoint of that many filters into a wider QuickNAT (:func:`~qnkit.nn.quicknat.widen_filters`:
    the same output)."""
    state = load_safetensors(_read_verified(folder, "model.safetensors"))
    if inflate:
        from qnkit.nn.quicknat import inflate_input_planes

        state = inflate_input_planes(state, model.config.num_channels)
    if widen_from is not None:
        from qnkit.nn.quicknat import QuickNATConfig, widen_filters

        narrow = QuickNATConfig.from_dict({**model.config.to_dict(), "num_filters": widen_from})
        state = widen_filters(state, narrow, model.config.num_filters)
    model.load_state_dict(state)


def load_state(folder: Path) -> dict:
    return torch.load(io.BytesIO(_read_verified(folder, "state.pt")), map_location="cpu", weights_only=True)


def build_model(network: dict) -> torch.nn.Module:
    from qnkit.nn.quicknat import QuickNAT, QuickNATConfig

    return QuickNAT(QuickNATConfig.from_dict(dict(network)))


def load_model(run_dir: Path, kind: str = "best") -> tuple[torch.nn.Module, dict]:
    """(network in eval mode on the CPU, checkpoint metadata) from RUN_DIR/checkpoints/<kind>."""
    folder = locate(run_dir, kind)
    meta = read_meta(folder, verify=False)  # load_weights hashes the bytes it loads
    model = build_model(meta["network"])
    load_weights(folder, model)
    return model.eval(), meta
