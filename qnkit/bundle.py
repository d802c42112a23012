"""The model bundle: read and verify what `qnkit export` wrote (torch-free).

A bundle is a folder::

    BUNDLE/qnkit.json            metadata (format, input size, preprocessing, threshold, training
                                 metrics, tool versions, verification figures, engine target,
                                 SHA-256 and size of every artefact)
    BUNDLE/model.onnx            FP32 graph, input "image" (N,C,H,W) -> output "probability" (N,1,H,W)
    BUNDLE/model.fp16.onnx       FP16 graph with FP32 inputs/outputs (optional)
    BUNDLE/model.int8.onnx       static QDQ INT8 graph (optional)
    BUNDLE/model.engine          serialized TensorRT engine (optional) + timing.cache
    BUNDLE/weights.safetensors   weights for the eager torch backend (network config in qnkit.json)
    BUNDLE/model.mc.onnx         FP32 graph with a second input, dropout_keep (Monte-Carlo dropout; optional)

The bundle folder is one signed-off unit and the trust boundary: ``qnkit.json`` carries
``manifest_sha256``, the SHA-256 of its own canonical content (every key but that one), and every
artefact's SHA-256, so an edited threshold, HU window or network config is refused like an edited
model file (:class:`BundleError`, one line), never a guess. Loaders take an artefact's bytes from
:meth:`Bundle.read`, which hashes exactly the bytes it returns (no hash-then-reopen gap). The hashes
detect accidents and edits made without re-sealing; they are not a signature against someone who
can write the folder (a TensorRT engine is native code: only load bundles from folders you trust).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qnkit.errors import QnkitInputError

__all__ = ["FORMAT", "VERSION", "METADATA_NAME", "MANIFEST_KEY", "BundleError", "Bundle", "load_bundle",
           "sha256_file", "sha256_bytes", "manifest_sha256", "sealed_metadata_text", "engine_mismatch",
           "int8_dot_product"]

FORMAT = "qnkit-bundle"
VERSION = 1
METADATA_NAME = "qnkit.json"
MANIFEST_KEY = "manifest_sha256"
FP32_ONNX, FP16_ONNX, INT8_ONNX = "model.onnx", "model.fp16.onnx", "model.int8.onnx"
ENGINE, TIMING_CACHE, WEIGHTS = "model.engine", "timing.cache", "weights.safetensors"
MC_ONNX = "model.mc.onnx"  # FP32 graph with Dropout2d masks as a second input (Monte-Carlo dropout)


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


def _canonical(metadata: dict) -> bytes:
    """The metadata without its manifest hash, as sorted compact UTF-8 JSON (independent of layout)."""
    content = {k: v for k, v in metadata.items() if k != MANIFEST_KEY}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_sha256(metadata: dict) -> str:
    """SHA-256 of the canonical content of ``qnkit.json`` (all keys except ``manifest_sha256``)."""
    return sha256_bytes(_canonical(metadata))


def sealed_metadata_text(metadata: dict) -> str:
    """The text of ``qnkit.json`` for ``metadata``, with its manifest hash added (what export writes).

    The hash is taken over the JSON round trip of ``metadata`` (tuples become lists), i.e. over
    exactly what a reader parses back.
    """
    plain = json.loads(json.dumps({k: v for k, v in metadata.items() if k != MANIFEST_KEY}, allow_nan=False))
    plain[MANIFEST_KEY] = manifest_sha256(plain)
    return json.dumps(plain, indent=1) + "\n"


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
    def input_planes(self) -> int:
        """Input planes per slice the network takes (its ``num_channels``: 1, or a 2.5-D model's context planes)."""
        return int(self.network.get("num_channels", 1))

    @property
    def int8_evidence_passed(self) -> bool:
        """True when ``qnkit.json`` chose INT8 on evidence that passed: the real CTs
        (``verification.int8_real_ct``, ``qnkit export --int8-evidence``) and the held-out phantoms
        (``verification.int8_phantoms``), with the INT8 graph in the bundle."""
        choice = self.metadata.get("cpu_precision") or {}
        verification = self.metadata.get("verification") or {}
        real = verification.get("int8_real_ct") or {}
        phantoms = verification.get("int8_phantoms") or {}
        return (choice.get("default") == "int8" and real.get("passed") is True and phantoms.get("passed") is True
                and self.has(INT8_ONNX))

    @property
    def cpu_precision(self) -> str:
        """The graph ``precision="auto"`` runs on the CPU: "int8" only when the bundle's INT8 evidence passed
        (:attr:`int8_evidence_passed`) and this CPU has an INT8 dot-product instruction
        (:func:`int8_dot_product`: without one INT8 is not the fast path it is meant to be); "fp32" otherwise."""
        if self.int8_evidence_passed and int8_dot_product()[0]:
            return "int8"
        return "fp32"

    @property
    def cpu_precision_why(self) -> str:
        """One line on why :attr:`cpu_precision` is what it is."""
        choice = self.metadata.get("cpu_precision") or {}
        if not self.int8_evidence_passed:
            return str(choice.get("why") or "no INT8 evidence on real CT and phantoms in this bundle")
        has_it, instruction = int8_dot_product()
        why = str(choice.get("why", "INT8 verified on real CT and phantoms"))
        if has_it:
            return f"{why}; this CPU has {instruction}"
        return f"the INT8 evidence passed ({why}), but this CPU has no INT8 dot-product instruction ({instruction})"

    @property
    def engine(self) -> dict | None:
        """The engine record (TensorRT version, GPU, precision, profile), or None."""
        return self.metadata.get("engine")

    def has(self, name: str) -> bool:
        return name in self.metadata.get("artefacts", {})

    def _record(self, name: str) -> dict:
        record = self.metadata.get("artefacts", {}).get(name)
        if record is None:
            have = ", ".join(sorted(self.metadata.get("artefacts", {}))) or "none"
            raise BundleError(f"{self.path}: the bundle has no {name} (it has: {have})")
        return record

    def read(self, name: str) -> bytes:
        """The bytes of artefact ``name``, hashed as read: what is returned is what was verified.

        Loaders parse these bytes (ONNX Runtime, safetensors, TensorRT all take bytes) instead of
        reopening the file, so a file swapped after the check cannot be what runs.
        """
        record = self._record(name)
        path = self.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{path}: missing (listed in {METADATA_NAME}); re-export the bundle") from None
        except OSError as exc:
            raise BundleError(f"{path}: unreadable ({exc.strerror or exc})") from None
        if sha256_bytes(data) != record["sha256"]:
            raise BundleError(f"{path}: SHA-256 does not match {METADATA_NAME} (modified or corrupt); "
                              f"re-export the bundle")
        self._verified.add(name)
        return data

    def artefact(self, name: str) -> Path:
        """Path of artefact ``name`` after checking that it exists and matches its SHA-256.

        For tools that can only open a path; whatever can take bytes should use :meth:`read`.
        """
        if name not in self._verified:
            self.read(name)
        return self.path / name

    def verify_all(self) -> list[dict]:
        """Check every artefact now; one record (name, bytes, sha256) per artefact checked."""
        checked = []
        for name, record in sorted(self.metadata.get("artefacts", {}).items()):
            data = self.read(name)
            checked.append({"name": name, "bytes": len(data), "sha256": record["sha256"]})
        return checked


#: CPU flags (Linux /proc/cpuinfo) of an INT8 dot-product instruction: x86 VNNI (AVX512 or AVX) and AMX, ARM's
#: SDOT/UDOT and I8MM. ONNX Runtime's INT8 kernels are its fast path only with one of them.
INT8_DOT_PRODUCT_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8",
                          "asimddp": "ARM dot product (SDOT/UDOT)", "i8mm": "ARM I8MM"}


def int8_dot_product(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """(whether this CPU has an INT8 dot-product instruction, which one or why not), from /proc/cpuinfo."""
    from qnkit.cpus import cpu_flags

    flags = cpu_flags(cpuinfo)
    if flags is None:
        return False, f"cannot tell: {cpuinfo} unreadable (not Linux?)"
    found = [name for flag, name in INT8_DOT_PRODUCT_FLAGS.items() if flag in flags]
    if found:
        return True, ", ".join(found)
    return False, f"none of {', '.join(INT8_DOT_PRODUCT_FLAGS.values())} in its flags"


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read ``path/qnkit.json``; with ``verify`` also check every artefact's SHA-256 now."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder (create one with `qnkit export RUN_DIR --out {path}`)")
    meta_path = path / METADATA_NAME
    try:
        metadata = json.loads(meta_path.read_bytes().decode("utf-8"))
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
    recorded = metadata.get(MANIFEST_KEY)
    if not isinstance(recorded, str):
        raise BundleError(f"{meta_path}: no {MANIFEST_KEY} (written by an older qnkit); re-export the bundle")
    try:
        computed = manifest_sha256(metadata)
    except ValueError:  # NaN or infinity: not canonical JSON
        computed = None
    if computed != recorded:
        raise BundleError(f"{meta_path}: content does not match its {MANIFEST_KEY} (edited after export); "
                          f"re-export the bundle")
    try:
        for key in ("model", "preprocessing", "threshold", "artefacts"):
            metadata[key]
        bundle = Bundle(path, metadata)
        bundle.hu_window, bundle.input_size, bundle.size_divisor, bundle.threshold, bundle.network
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: incomplete metadata ({type(exc).__name__}: {exc})") from None
    if verify:
        bundle.verify_all()
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
