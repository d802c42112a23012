"""The model bundle: read and verify what `qnkit export` wrote (torch-free).

A bundle is a folder::

    BUNDLE/qnkit.json            metadata (format, input size, preprocessing, threshold, training
                                 metrics, tool versions, verification figures, engine target,
                                 SHA-256 and size of every artefact)
    BUNDLE/model.onnx            FP32 graph, input "image" (N,1,H,W) -> output "probability"
    BUNDLE/model.fp16.onnx       FP16 graph with FP32 inputs/outputs (optional)
    BUNDLE/model.int8.onnx       static QDQ INT8 graph (optional)
    BUNDLE/model.engine          serialized TensorRT engine (optional) + timing.cache
    BUNDLE/weights.safetensors   weights for the eager torch backend (network config in qnkit.json)

Every artefact is checked against its recorded SHA-256 before use, so a tampered, truncated or
swapped file is an error (:class:`BundleError`, one line), never a guess.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qnkit.errors import QnkitInputError

__all__ = ["FORMAT", "VERSION", "METADATA_NAME", "BundleError", "Bundle", "load_bundle", "sha256_file",
           "engine_mismatch"]

FORMAT = "qnkit-bundle"
VERSION = 1
METADATA_NAME = "qnkit.json"
FP32_ONNX, FP16_ONNX, INT8_ONNX = "model.onnx", "model.fp16.onnx", "model.int8.onnx"
ENGINE, TIMING_CACHE, WEIGHTS = "model.engine", "timing.cache", "weights.safetensors"


class BundleError(QnkitInputError):
    """A bundle that cannot be used: missing, unreadable, tampered or built for something else."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Bundle:
    """A loaded bundle: its folder and parsed ``qnkit.json``; artefacts are verified on access."""

    path: Path
    metadata: dict
    _verified: set = field(default_factory=set, repr=False)

    @property
    def hu_window(self) -> tuple[float, float]:
        lo, hi = self.metadata["preprocessing"]["hu_window"]
        return float(lo), float(hi)

    @property
    def domain(self) -> dict | None:
        """The model's domain (``qnkit.json`` "domain"): pixel_spacing_mm, slice_thickness_mm [min, max],
        hu_window, input_size, training_data, figures; None for a bundle exported before the
        millimetre contract (such a model is fed half the input's resolution)."""
        domain = self.metadata.get("domain")
        return dict(domain) if isinstance(domain, dict) else None

    @property
    def input_size(self) -> tuple[int, int]:
        """The model's nominal low-resolution input grid (h, w), e.g. (256, 256) for 512x512 CT."""
        h, w = self.metadata["model"]["input_size"]
        return int(h), int(w)

    @property
    def dynamic_hw(self) -> bool:
        """True when the ONNX graphs accept any h, w that are multiples of :attr:`size_divisor`."""
        return bool(self.metadata["model"].get("dynamic_hw", False))

    @property
    def size_divisor(self) -> int:
        return int(self.metadata["preprocessing"]["size_divisor"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def network(self) -> dict:
        """QuickNATConfig fields (``QuickNATConfig.from_dict(bundle.network)``)."""
        return dict(self.metadata["model"]["network"])

    @property
    def engine(self) -> dict | None:
        """The engine record (TensorRT version, GPU, precision, profile), or None."""
        return self.metadata.get("engine")

    def has(self, name: str) -> bool:
        return name in self.metadata.get("artefacts", {})

    def artefact(self, name: str) -> Path:
        """Path of artefact ``name`` after checking that it exists and matches its SHA-256."""
        record = self.metadata.get("artefacts", {}).get(name)
        if record is None:
            have = ", ".join(sorted(self.metadata.get("artefacts", {}))) or "none"
            raise BundleError(f"{self.path}: the bundle has no {name} (it has: {have})")
        path = self.path / name
        if name not in self._verified:
            if not path.is_file():
                raise BundleError(f"{path}: missing (listed in {METADATA_NAME}); re-export the bundle")
            if sha256_file(path) != record["sha256"]:
                raise BundleError(f"{path}: SHA-256 does not match {METADATA_NAME} (modified or corrupt); "
                                  f"re-export the bundle")
            self._verified.add(name)
        return path


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read ``path/qnkit.json``; with ``verify`` also check every artefact's SHA-256 now."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder (create one with `qnkit export RUN_DIR --out {path}`)")
    meta_path = path / METADATA_NAME
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: not a qnkit bundle (no {METADATA_NAME})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not a qnkit bundle (format "
                          f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
    if metadata.get("version") != VERSION:
        raise BundleError(f"{meta_path}: bundle format version {metadata.get('version')!r} is not supported "
                          f"(this qnkit reads version {VERSION}); re-export the bundle")
    try:
        for key in ("model", "preprocessing", "threshold", "artefacts"):
            metadata[key]
        bundle = Bundle(path, metadata)
        bundle.hu_window, bundle.input_size, bundle.size_divisor, bundle.threshold, bundle.network
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: incomplete metadata ({type(exc).__name__}: {exc})") from None
    if verify:
        for name in metadata["artefacts"]:
            bundle.artefact(name)
    return bundle


def engine_mismatch(record: dict, *, tensorrt_version: str, gpu_name: str, compute_capability: str) -> str | None:
    """Why an engine built for ``record`` must not run here (None when it may).

    TensorRT engines are specific to the TensorRT version and the GPU model (compute capability);
    running a foreign one fails or, worse, misbehaves, so it is rebuilt from the ONNX instead.
    """
    built = (f"TensorRT {record.get('tensorrt')}, {record.get('gpu')} "
             f"(compute capability {record.get('compute_capability')})")
    here = f"TensorRT {tensorrt_version}, {gpu_name} (compute capability {compute_capability})"
    if str(record.get("tensorrt")) != str(tensorrt_version):
        return f"the engine was built for {built}; this machine has {here}"
    if str(record.get("compute_capability")) != str(compute_capability) or record.get("gpu") != gpu_name:
        return f"the engine was built for {built}; this machine has {here}"
    return None
