"""Training settings: typed dataclasses with the report's defaults, read from `.ini` files.

The report keeps its settings in two `.ini` files (local machine, cluster) with sections for
common, data, network, training and evaluation settings. Every key has a typed default here, so an
`.ini` only lists what differs; command-line options override both. Unknown sections or keys and
values that do not parse or are out of range raise QnkitInputError naming file, section and key,
because a silently ignored typo in a training configuration costs hours.
"""
from __future__ import annotations

import configparser
import dataclasses
import io
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from qnkit.errors import QnkitInputError
from qnkit.nn.config import QuickNATConfig

HERE = Path(__file__).resolve().parent
PRESETS = {"local": HERE / "local.ini", "cluster": HERE / "cluster.ini", "shipped": HERE / "shipped.ini",
           "shipped-gpu": HERE / "shipped_gpu.ini", "shipped-fast": HERE / "shipped_fast.ini",
           "shipped-context": HERE / "shipped_context.ini"}


@dataclass
class CommonSettings:
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    num_workers: int = 0
    log_dir: str = ""  # TensorBoard folder; "" -> RUN_DIR/tensorboard; relative paths are under RUN_DIR
    deterministic: bool = True
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    num_threads: int = 0  # torch intra-op threads per process; 0 -> QNKIT_NUM_THREADS, else cores / local processes
    progress: bool = True


@dataclass
class DataSettings:
    hu_lo: float = -200.0
    hu_hi: float = 400.0
    slice_margin: int = 20
    omega0: float = 2.0
    # Filter rule for cases whose tumor distorts the kidney (either limit; empty = no limit).
    max_radiographic_size_cm: typing.Optional[float] = None
    max_tumor_kidney_ratio: typing.Optional[float] = 1.0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    cache_dir: str = ""  # "" -> RUN_DIR/cache; relative paths are under RUN_DIR
    pad_multiple: int = 16
    # The model's in-plane pixel spacing in mm (every case is resampled to it), or "auto":
    # 2 x the median pixel spacing of the training-pool cases (KiTS19: ~1.6 mm, i.e. 512 -> 256 px).
    pixel_spacing_mm: str = "auto"
    # Train on the kidney fraction of each 2x2 block (0, .25, .5, .75, 1) instead of the binary
    # half-resolution mask: the bilinear upsampling at inference then puts the border where the
    # full-resolution one is, and kidney volumes lose the binary rule's outward bias.
    soft_targets: bool = True
    # 2.5-D input: the distance in mm along z between the [NETWORK] num_channels planes the network sees per
    # slice (the slice and its neighbours at -/+ context_mm, -/+ 2 context_mm, ...; interpolated between
    # slices, so the same whatever the CT's slice thickness). 0: one plane, the 2-D model (num_channels 1).
    context_mm: float = 0.0
    # The loss weight of a case's hard negatives (hard_negatives.nii.gz beside its labels: qnkit synth writes the
    # renal sinus and hilum of its anatomy phantoms) as a multiple of its kidney's class weight, where that is more
    # than their own: median-frequency balancing otherwise weighs a false positive ~30x less than a missed kidney
    # pixel, and the sinus inside the kidney is taken. 0: off (the file is not read).
    hard_negative_weight: float = 0.0
    # The loss weight of each pixel's class: median_frequency (QuickNAT's: median class count / its class's count,
    # per volume) or none (every pixel 1, as nnU-Net's cross-entropy); the border weight omega0 is added either way.
    class_weights: str = "median_frequency"


# [NETWORK] holds the fields of QuickNATConfig with its defaults, mutable so that .ini files and
# command-line options can set them one by one; runner.network_config validates the result.
NetworkSettings = dataclasses.make_dataclass(
    "NetworkSettings", [(f.name, f.type, field(default=f.default)) for f in fields(QuickNATConfig)])
NetworkSettings.__module__ = __name__


@dataclass
class TrainingSettings:
    epochs: int = 20
    micro_batch: int = 4
    effective_batch: int = 16
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # step: StepLR(step_size, gamma), the report's; poly: lr x (1 - e / E)^0.9 at epoch e of the E epochs
    # the schedule runs (nnU-Net's), which reaches ~0 by the run's last epoch whatever its length
    schedule: str = "step"
    step_size: int = 50
    gamma: float = 0.5
    alpha: float = 1.0  # weight of the Dice loss
    beta: float = 0.5  # weight of the weighted BCE loss
    early_stop_patience: int = 2  # stop when the validation loss rose for more than this many epochs in a row
    # mixed precision: float16 autocast on CUDA; bfloat16 autocast on a CPU with native bf16 (AVX512-BF16,
    # AMX; qnkit.cpus.native_bf16), FP32 on any other CPU, where emulated bf16 would be slower
    amp: bool = False
    # torch.compile the training step's network (inductor): faster steps after a minute or two of compiling
    # at the start of each (resumed) run; validation stays eager (its whole slices vary in size)
    compile: bool = False
    # quantisation-aware fine-tuning (train/qat.py): the convolutions export may put in INT8 compute from
    # fake-quantised inputs, weights and outputs, batch norms frozen; a short run from trained weights (--init-from)
    qat: bool = False
    # with qat: train towards the FP32 network it started from (the sigmoid of its output, from its --init-from
    # weights) instead of the labels: export's per-layer search asks for agreement with those FP32 masks, which a
    # label loss does not train for (self-distillation)
    qat_teacher: bool = False
    augment: bool = False  # random scale/rotation/contrast/blur/noise per training slice (train/augment.py)
    slices_per_epoch: int = 0  # 0 = every training slice each epoch; else a fresh random subset of this many
    # a small data set repeats its slices within an epoch up to this many optimiser steps (nnU-Net's fixed
    # iterations per epoch): the report's lr and schedule then converge on 16 cases as on 210
    min_steps_per_epoch: int = 100
    log_images: int = 4  # slices shown for the best and worst batch; 0 = no images
    # train on square windows of this many pixels instead of whole slices (0): the step costs about
    # (crop / slice side)^2 as much; validation and inference still see whole slices
    crop_size: int = 0
    crop_kidney_p: float = 0.67  # share of windows centred on a kidney (the rest: anywhere in the body)


@dataclass
class EvalSettings:
    threshold: float = 0.5
    batch_size: int = 16
    checkpoint: str = "best"  # best | last
    # a fixed KiTS19-layout folder of held-out cases scored after every epoch beside the validation split
    # (metrics.jsonl "reference_dice"), e.g. an earlier model's validation phantoms: runs that differ in data
    # and loop are compared on the same cases; "" = none
    reference_data: str = ""
    reference_every: int = 1  # score the reference set every this many epochs (and at the run's last epoch)


SECTIONS = {
    "COMMON": ("common", CommonSettings),
    "DATA": ("data", DataSettings),
    "NETWORK": ("network", NetworkSettings),
    "TRAINING": ("training", TrainingSettings),
    "EVAL": ("eval", EvalSettings),
}


@dataclass
class Settings:
    common: CommonSettings = field(default_factory=CommonSettings)
    data: DataSettings = field(default_factory=DataSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, attr)) for name, (attr, _) in SECTIONS.items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings") -> "Settings":
        out = cls()
        for section, values in data.items():
            for key, value in values.items():
                out.set(section, key, value, source)
        out.validate(source)
        return out

    def to_ini(self) -> str:
        parser = configparser.ConfigParser(interpolation=None)
        for section, values in self.to_dict().items():
            parser[section] = {k: "" if v is None else str(v) for k, v in values.items()}
        buf = io.StringIO()
        parser.write(buf)
        return buf.getvalue()

    def set(self, section: str, key: str, value, source: str) -> None:
        """Set one value, parsing strings by the field's type; errors name source, section and key."""
        section = section.upper()
        if section not in SECTIONS:
            raise QnkitInputError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        attr, klass = SECTIONS[section]
        hints = typing.get_type_hints(klass)
        key = key.lower()
        if key not in hints:
            known = ", ".join(f.name for f in fields(klass))
            raise QnkitInputError(f"{source}: unknown key '{key}' in [{section}] (known: {known})")
        try:
            parsed = _parse(value, hints[key])
        except ValueError as exc:
            raise QnkitInputError(f"{source}: [{section}] {key} = {value!r}: {exc}") from None
        setattr(getattr(self, attr), key, parsed)

    def validate(self, source: str = "settings") -> None:
        """Range checks that parsing alone cannot do."""
        c, d, n, t, e = self.common, self.data, self.network, self.training, self.eval
        checks = [
            ("COMMON", "device", c.device in ("cpu", "cuda", "auto"), "must be cpu, cuda or auto"),
            ("COMMON", "num_workers", c.num_workers >= 0, "must be >= 0"),
            ("COMMON", "dist_backend", c.dist_backend in ("auto", "nccl", "gloo"), "must be auto, nccl or gloo"),
            ("COMMON", "num_threads", c.num_threads >= 0, "must be >= 0"),
            ("DATA", "hu_hi", d.hu_hi > d.hu_lo, "must be greater than hu_lo"),
            ("DATA", "slice_margin", d.slice_margin >= 0, "must be >= 0"),
            ("DATA", "omega0", d.omega0 >= 0, "must be >= 0"),
            ("DATA", "max_radiographic_size_cm", d.max_radiographic_size_cm is None or d.max_radiographic_size_cm > 0,
             "must be > 0 or empty"),
            ("DATA", "max_tumor_kidney_ratio", d.max_tumor_kidney_ratio is None or d.max_tumor_kidney_ratio > 0,
             "must be > 0 or empty"),
            ("DATA", "test_fraction", 0 <= d.test_fraction < 1, "must be in [0, 1)"),
            ("DATA", "val_fraction", 0 < d.val_fraction < 1, "must be in (0, 1)"),
            ("DATA", "pad_multiple", d.pad_multiple >= 1, "must be >= 1"),
            ("DATA", "pixel_spacing_mm", _auto_or_positive(d.pixel_spacing_mm), "must be auto or a number > 0 (mm)"),
            ("DATA", "context_mm", d.context_mm >= 0, "must be >= 0 (mm; 0 = a 2-D model)"),
            ("DATA", "hard_negative_weight", d.hard_negative_weight >= 0, "must be >= 0 (0 = off)"),
            ("DATA", "class_weights", d.class_weights in ("median_frequency", "none"),
             "must be median_frequency or none"),
            ("NETWORK", "num_channels", n.num_channels >= 1 and n.num_channels % 2 == 1,
             "must be an odd number >= 1 (the slice and as many planes on each side of it)"),
            ("NETWORK", "num_filters", n.num_filters >= 1, "must be >= 1"),
            ("NETWORK", "num_class", n.num_class == 1, "must be 1 (kidney vs background, sigmoid output)"),
            ("NETWORK", "drop_out", 0 <= n.drop_out < 1, "must be in [0, 1)"),
            ("TRAINING", "epochs", t.epochs >= 1, "must be >= 1"),
            ("TRAINING", "micro_batch", t.micro_batch >= 1, "must be >= 1"),
            ("TRAINING", "effective_batch", t.effective_batch >= 1, "must be >= 1"),
            ("TRAINING", "lr", t.lr > 0, "must be > 0"),
            ("TRAINING", "beta1", 0 <= t.beta1 < 1, "must be in [0, 1)"),
            ("TRAINING", "beta2", 0 <= t.beta2 < 1, "must be in [0, 1)"),
            ("TRAINING", "eps", t.eps > 0, "must be > 0"),
            ("TRAINING", "schedule", t.schedule in ("step", "poly"), "must be step or poly"),
            ("TRAINING", "step_size", t.step_size >= 1, "must be >= 1"),
            ("TRAINING", "gamma", t.gamma > 0, "must be > 0"),
            ("TRAINING", "alpha", t.alpha >= 0, "must be >= 0"),
            ("TRAINING", "beta", t.beta >= 0, "must be >= 0"),
            ("TRAINING", "early_stop_patience", t.early_stop_patience >= 0, "must be >= 0"),
            ("TRAINING", "qat_teacher", t.qat or not t.qat_teacher, "needs qat = true (it is quantisation-aware "
             "fine-tuning's target)"),
            ("TRAINING", "log_images", t.log_images >= 0, "must be >= 0"),
            ("TRAINING", "slices_per_epoch", t.slices_per_epoch >= 0, "must be >= 0"),
            ("TRAINING", "min_steps_per_epoch", t.min_steps_per_epoch >= 0, "must be >= 0"),
            ("TRAINING", "crop_size", t.crop_size >= 0, "must be >= 0 (0 = whole slices)"),
            ("TRAINING", "crop_kidney_p", 0 <= t.crop_kidney_p <= 1, "must be in [0, 1]"),
            ("EVAL", "threshold", 0 < e.threshold < 1, "must be in (0, 1)"),
            ("EVAL", "batch_size", e.batch_size >= 1, "must be >= 1"),
            ("EVAL", "checkpoint", e.checkpoint in ("best", "last"), "must be best or last"),
            ("EVAL", "reference_every", e.reference_every >= 1, "must be >= 1"),
        ]
        for section, key, ok, message in checks:
            if not ok:
                value = getattr(getattr(self, SECTIONS[section][0]), key)
                raise QnkitInputError(f"{source}: [{section}] {key} = {value!r} {message}")
        if t.alpha == 0 and t.beta == 0:
            raise QnkitInputError(f"{source}: [TRAINING] alpha and beta are both 0 (no loss)")
        if (n.num_channels > 1) != (d.context_mm > 0):
            raise QnkitInputError(
                f"{source}: [NETWORK] num_channels = {n.num_channels} and [DATA] context_mm = {d.context_mm:g} disagree: "
                f"a 2.5-D model needs num_channels odd > 1 and context_mm > 0 (mm between its planes), a 2-D model "
                f"num_channels 1 and context_mm 0")


def _auto_or_positive(text) -> bool:
    """`auto`, or a finite number > 0."""
    text = str(text).strip().lower()
    if text == "auto":
        return True
    try:
        value = float(text)
    except ValueError:
        return False
    return 0 < value < float("inf")


def _parse(value, kind):
    """Parse `value` (usually a string from an .ini or the command line) as `kind`."""
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _parse(value, inner)
    if isinstance(value, str):
        value = value.strip()
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean (true/false)")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError("expected an integer") from None
    if kind is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        return out
    if kind is str:
        return str(value)
    raise ValueError(f"unsupported setting type {kind}")


def read_ini(path: str | Path, base: Settings | None = None) -> Settings:
    """Settings from an .ini file on top of `base` (default: the dataclass defaults)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise QnkitInputError(f"settings file not found: {path}")
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=source)
    except (configparser.Error, UnicodeDecodeError) as exc:
        message = " ".join(str(exc).split())
        raise QnkitInputError(f"{source}: not a valid .ini file: {message}") from None
    settings = Settings.from_dict(base.to_dict()) if base is not None else Settings()
    for section in parser.sections():
        for key, value in parser.items(section):
            settings.set(section, key, value, source)
    settings.validate(source)
    return settings


def load_settings(path: str | Path | None = None, overrides: dict | None = None) -> Settings:
    """Defaults <- .ini (a path, or a preset name: local | cluster | shipped) <- command-line overrides.

    `overrides` maps (SECTION, key) to a value; None values are skipped.
    """
    if path is None:
        settings = Settings()
    else:
        path = PRESETS.get(str(path), path)
        settings = read_ini(path)
    apply_overrides(settings, overrides or {})
    return settings


def apply_overrides(settings: Settings, overrides: dict) -> Settings:
    for (section, key), value in overrides.items():
        if value is not None:
            settings.set(section, key, value, f"command-line option for {key}")
    settings.validate("command line")
    return settings
