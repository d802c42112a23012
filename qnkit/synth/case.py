"""One anatomy-based case: a body (:mod:`.anatomy`), a look (:mod:`.appearance`), the image (:mod:`.render`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qnkit.errors import QnkitInputError

from .anatomy import draw_grid, make_anatomy
from .appearance import PHASE_P, PHASES, draw_look, draw_lookalikes, phase_probabilities
from .classic import SynthCase, _check_int, tumor_diameter_cm
from .render import render
from .hilum import add_hilar_structures, fill_pelvis, hard_negative_mask
from .sinus import carve_sinus

#: Versions of the anatomy recipe (:func:`.anatomy.make_anatomy`); the one used is recorded with every
#: case so that a dataset names what made it. 1: the shipped kidney-synth model's data; 2 (default): the
#: spleen and liver moved and resized towards the kidneys, kidney positions jittered; 3: version 2 plus, in
#: :data:`.anatomy.MASS_P` of the cases, a large mass (250-750 mL) pressed against one kidney and labelled
#: background, as the seed's convention has it (a mass that distorts the kidney is not kidney); 4: version 3's
#: bodies with look-alikes (:data:`.appearance.LOOKALIKE_P`): the spleen, the liver or the mass drawn at the
#: kidney's own HU in some cases, so that only shape and place tell them from it; 5: version 4's bodies with
#: the renal sinus opened at the hilum and labelled background (:mod:`.sinus`): the kidney label is the
#: parenchyma, as in TotalSegmentator's masks and kidney dosimetry, not KiTS19's sinus-filled outline; 6: version
#: 5's bodies with what leaves each kidney at its hilum (:mod:`.hilum`: renal vein, renal artery, pelvis and
#: ureter, labelled background), so that the network learns where the kidney ends on its medial side; 7: version
#: 6's bodies with the renal pelvis filling the part of the sinus nearest the hilum in most kidneys (urine:
#: water-dense unenhanced, bright excretory; :func:`.hilum.fill_pelvis`) instead of fat with patches of urine.
RECIPE_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
RECIPE_VERSION = 7
DEFAULT_PIXEL_RANGE = (1.3, 2.6)


def check_anatomy_options(version, phase_weights) -> tuple[int, tuple]:
    """The anatomy recipe `version` (None: the newest) and the phase probabilities, checked; raise
    :class:`QnkitInputError` naming what is wrong."""
    version = RECIPE_VERSION if version is None else version
    if version not in RECIPE_VERSIONS:
        raise QnkitInputError(f"anatomy version must be one of {', '.join(map(str, RECIPE_VERSIONS))}, got {version!r}")
    try:
        phase_p = phase_probabilities(PHASE_P if phase_weights is None else phase_weights)
    except ValueError as exc:
        raise QnkitInputError(str(exc)) from None
    return version, phase_p


def make_anatomy_case(index: int, *, seed: int = 0, labels_from: Path | None = None,
                      pixel_range: tuple[float, float] = DEFAULT_PIXEL_RANGE, max_size: int = 512,
                      version: int = RECIPE_VERSION, phase_weights=None, keep_tissue: bool = False) -> SynthCase:
    """Case number `index` (``case_{index:05d}``) of anatomy recipe `version`, seeded by ``(seed, index)`` only.

    `phase_weights` (one per contrast phase, default :data:`.appearance.PHASE_P`) say how often each
    phase is drawn: a protocol's mix (e.g. mostly unenhanced for SPECT/CT) without changing the bodies.
    `keep_tissue` keeps the tissue labels (:data:`.atlas.TISSUES`) on the case: what each voxel was drawn as,
    to score a model on parts of the anatomy (the sinus, the hilum) that the KiTS labels call background."""
    index = _check_int("index", index, 0)
    seed = _check_int("seed", seed, 0)
    version, phase_p = check_anatomy_options(version, phase_weights)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    pixel, thickness = draw_grid(rng, pixel_range)
    body = make_anatomy(rng, pixel_mm=pixel, thickness_mm=thickness, labels_from=labels_from, max_size=max_size,
                        version=version, mass_rng=np.random.default_rng(np.random.SeedSequence([seed, index, 3])))
    if version >= 5:
        body.meta["sinus"] = carve_sinus(np.random.default_rng(np.random.SeedSequence([seed, index, 5])),
                                         body.tissue, body.labels, body.spacing)
    if version >= 6:
        body.meta["hilum"] = add_hilar_structures(np.random.default_rng(np.random.SeedSequence([seed, index, 6])),
                                                  body.tissue, body.labels, body.spacing)
    if version >= 7:
        body.meta["pelvis"] = fill_pelvis(np.random.default_rng(np.random.SeedSequence([seed, index, 7])),
                                          body.tissue, body.labels, body.spacing)
    look = draw_look(rng, phase_p=phase_p)
    if version >= 4:
        look = draw_lookalikes(np.random.default_rng(np.random.SeedSequence([seed, index, 4])), look)
    imaging = render(rng, body.tissue, body.labels, body.spacing, look)
    size_cm = body.meta.pop("radiographic_size", None)
    if size_cm is None:
        size_cm = tumor_diameter_cm(body.labels, body.affine)
    meta = {
        "synthetic": True,
        "qnkit_synth": {"generator": "anatomy", "recipe_version": version, "seed": seed, "index": index,
                        "pixel_range_mm": list(pixel_range), "labels_from": "kits19" if labels_from else None,
                        "phase": look.phase, "wild_appearance": look.wild,
                        **({"lookalikes": [n for n in look.lookalikes if n != "mass" or body.meta.get("mass")]}
                           if version >= 4 else {}),
                        "phase_probabilities": dict(zip(PHASES, (round(p, 4) for p in phase_p))),
                        **{k: (float(v) if isinstance(v, np.floating) else v) for k, v in body.meta.items()}},
        "slice_thickness": round(float(body.spacing[0]), 4),
        "pixel_spacing": round(float(body.spacing[2]), 6),
        "num_slices": int(body.labels.shape[0]),
    }
    return SynthCase(case_id=f"case_{index:05d}", imaging=imaging, segmentation=body.labels, affine=body.affine,
                     radiographic_size=float(size_cm), meta=meta, tissue=body.tissue if keep_tissue else None,
                     hard_negatives=hard_negative_mask(body.tissue, body.labels) if version >= 5 else None)
