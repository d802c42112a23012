"""What each tissue looks like: HU drawn per case around published ranges, for four contrast phases.

Ranges (HU) follow the usual abdominal CT values: unenhanced parenchyma 30-65, fat -120..-60,
cortical bone 500-1100; in the corticomedullary (late arterial) phase the renal cortex enhances to
150-260 HU while the medulla stays at 50-110 and the aorta reaches 200-450; in the nephrographic
(portal venous) phase cortex and medulla are alike (130-220) and the liver is at 95-135; in the
excretory phase the collecting system fills with contrast (250-900). A case draws one phase and
one value per tissue inside its range; with probability ``wild`` every value is moved further
(SynthSeg-style), so that the network learns shape and context rather than exact numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PHASES = ("unenhanced", "corticomedullary", "nephrographic", "excretory")
#: How often a case draws each phase unless told otherwise (``qnkit synth --phases``).
PHASE_P = (0.15, 0.35, 0.35, 0.15)

# tissue: (unenhanced, corticomedullary, nephrographic, excretory) HU ranges.
RANGES: dict[str, tuple] = {
    "cortex": ((25, 42), (150, 260), (130, 220), (100, 170)),
    "medulla": ((20, 38), (50, 110), (125, 215), (110, 180)),
    "urine": ((0, 20), (0, 25), (0, 30), (250, 900)),
    "sinus_fat": ((-100, -40), (-100, -40), (-100, -40), (-100, -40)),
    "tumor": ((20, 45), (60, 180), (60, 150), (50, 120)),
    "necrosis": ((0, 30), (5, 35), (5, 35), (5, 35)),
    "cyst": ((-5, 20), (-5, 20), (-5, 20), (-5, 20)),
    "liver": ((45, 70), (60, 95), (95, 135), (80, 110)),
    "spleen": ((40, 55), (90, 160), (100, 140), (85, 115)),
    "pancreas": ((35, 50), (90, 150), (80, 120), (70, 100)),
    "adrenal": ((20, 40), (50, 100), (50, 90), (40, 80)),
    "gallbladder": ((0, 25), (0, 25), (0, 25), (0, 25)),
    "bladder": ((0, 20), (0, 20), (0, 25), (20, 500)),
    "prostate": ((30, 55), (40, 80), (50, 90), (45, 80)),
    "bowel_wall": ((30, 50), (60, 120), (60, 110), (50, 90)),
    "artery": ((35, 55), (200, 450), (130, 220), (100, 150)),
    "vein": ((35, 55), (60, 140), (110, 190), (100, 150)),
    "portal_vein": ((35, 55), (80, 160), (150, 230), (100, 150)),
    "heart": ((35, 50), (150, 350), (110, 180), (90, 140)),
    "lung": ((-900, -750),) * 4,
    "cancellous": ((120, 320),) * 4,
    "cortical": ((500, 1100),) * 4,
    "cartilage": ((80, 250),) * 4,
    "spinal_cord": ((20, 45),) * 4,
    "muscle": ((35, 55), (40, 65), (45, 70), (45, 70)),
    "fat": ((-120, -80),) * 4,
    "visceral_fat": ((-110, -60),) * 4,
    "soft_tissue": ((10, 50), (15, 60), (20, 70), (20, 70)),
    "skin": ((0, 60),) * 4,
    "esophagus": ((30, 55), (40, 70), (40, 70), (40, 70)),
    "gas": ((-1000, -750),) * 4,
    "fluid": ((0, 30),) * 4,
    "oral_contrast": ((150, 600),) * 4,
    "feces": ((-300, 30),) * 4,
    "table": ((-300, 300),) * 4,
}


@dataclass
class Look:
    """One case's appearance: phase, a HU value per tissue, texture, blur and noise settings."""

    phase: str
    hu: dict
    texture_hu: dict  # std of the smooth within-tissue variation
    wild: bool
    blur_px: float  # in-plane partial-volume blur (Gaussian sigma, pixels)
    blur_slices: float
    noise_hu: float
    noise_grain_px: float  # correlation of the noise (reconstruction kernel): 0 = sharp kernel
    sharpen: float  # unsharp-mask amount (edge-enhancing kernels)
    hu_offset: float
    oral_contrast: float  # probability weight of positive oral contrast in the bowel
    gas: float
    cortex_mm: float
    outside_value: float  # value outside the reconstruction circle
    circle: bool
    table: bool
    mass_hu: float | None = None  # a large mass's mean HU; None: the case's tumor HU give or take (version 3)
    mass_texture_hu: float | None = None
    lookalikes: tuple = ()  # organs drawn at the kidney's HU (anatomy version 4), for the case's record


def phase_probabilities(weights) -> tuple:
    """`weights` (one per phase of :data:`PHASES`, non-negative, not all zero) scaled to sum to 1."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != len(PHASES) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"phase weights must be {len(PHASES)} non-negative numbers, not all zero "
                         f"({', '.join(PHASES)}), got {','.join(f'{v:g}' for v in w)}")
    return tuple(float(v) for v in w / w.sum())


def draw_look(rng: np.random.Generator, wild_p: float = 0.2, phase_p: tuple = PHASE_P) -> Look:
    """Draw a phase (probabilities `phase_p`, one per :data:`PHASES`) and every tissue's HU for one case.

    The phase costs one draw from `rng` whatever `phase_p` is, so the bodies of a seed do not change
    with it."""
    phase_i = int(rng.choice(len(PHASES), p=phase_p))
    wild = bool(rng.random() < wild_p)
    hu, tex = {}, {}
    for name, ranges in RANGES.items():
        lo, hi = ranges[phase_i]
        v = rng.uniform(lo, hi)
        if wild and name not in ("gas", "lung", "fat", "visceral_fat", "sinus_fat"):
            v += rng.normal(0, 0.25 * (hi - lo) + 20)
        hu[name] = float(v)
        tex[name] = float(rng.uniform(3, 12))
    if PHASES[phase_i] == "corticomedullary":
        tex["spleen"] = float(rng.uniform(15, 45))  # arterial "zebra" spleen
    tex["tumor"] = float(rng.uniform(10, 35))
    tex["feces"] = float(rng.uniform(40, 120))
    sharp = rng.random() < 0.3
    return Look(
        phase=PHASES[phase_i], hu=hu, texture_hu=tex, wild=wild,
        blur_px=float(rng.uniform(0.3, 1.0)), blur_slices=float(rng.uniform(0.2, 0.6)),
        noise_hu=float(rng.uniform(15, 45) if sharp else rng.uniform(4, 28)),
        noise_grain_px=0.0 if sharp else float(rng.uniform(0.4, 1.2)),
        sharpen=float(rng.uniform(0.3, 1.0)) if sharp else 0.0,
        hu_offset=float(rng.normal(0, 8)),
        oral_contrast=float(rng.choice([0.0, 0.0, 0.4, 0.8])), gas=float(rng.uniform(0.05, 0.3)),
        cortex_mm=float(rng.uniform(4, 8)),
        outside_value=float(rng.choice([-1024.0, -2048.0, -3024.0, -1000.0])),
        circle=bool(rng.random() < 0.5), table=bool(rng.random() < 0.7),
    )


#: Anatomy version 4's look-alikes: how often each neighbour is drawn at the kidney's own HU. In real CT the
#: spleen and liver enhance close to the renal parenchyma in many phases and patients (and a solid mass
#: against a kidney often enhances like it), so intensity alone must never separate them: the network has to
#: find the kidney by its shape, its sinus and its place.
LOOKALIKE_P = {"spleen": 0.4, "liver": 0.25, "mass": 0.5}


def draw_lookalikes(rng: np.random.Generator, look: Look) -> Look:
    """`look` with some neighbours of the kidney moved onto the kidney's parenchyma HU (:data:`LOOKALIKE_P`).

    Drawn from a stream of its own, after everything else, so a case that draws no look-alike keeps every
    value of the look it was given. The value is the parenchyma's (cortex and medulla averaged, as the
    nephrographic phase shows them) within a few HU, with a texture like the cortex's."""
    hu, tex = dict(look.hu), dict(look.texture_hu)
    parenchyma = 0.5 * (hu["cortex"] + hu["medulla"])
    chosen = [name for name, p in LOOKALIKE_P.items() if rng.random() < p]
    mass_hu = mass_texture = None
    for name in chosen:
        value = float(parenchyma + rng.normal(0.0, 8.0))
        texture = float(tex["cortex"] * rng.uniform(0.8, 1.5))
        if name == "mass":
            mass_hu, mass_texture = value, texture
        else:
            hu[name], tex[name] = value, texture
    if not chosen:
        return look
    return replace(look, hu=hu, texture_hu=tex, mass_hu=mass_hu, mass_texture_hu=mass_texture,
                   lookalikes=tuple(chosen))
