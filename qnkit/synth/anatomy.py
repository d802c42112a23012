"""A new body per case: the atlas deformed, and real KiTS19 kidneys put where its kidneys were.

:func:`make_anatomy` draws an output grid (pixel spacing, slice thickness, field of view, slab
around the kidneys), a random smooth deformation of the atlas (body size and shape, organ
positions), samples the atlas's tissue labels through it, then swaps each atlas kidney for a
real kidney (with its tumor, if any) taken from a KiTS19 label map, centred where the atlas
kidney lay. One kidney may be left out (a nephrectomy or a solitary kidney) and cysts may be
added. The result is a tissue-label volume and a KiTS label volume (0, 1 kidney, 2 tumor) on
the output grid, in qnkit's internal layout (slices superior->inferior, rows anterior->posterior,
columns patient right->left).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from qnkit.errors import QnkitInputError

from .atlas import LABEL, load_atlas

KITS_SEGMENTATION = "segmentation.nii.gz"


@dataclass
class Anatomy:
    """Tissue labels and KiTS labels on one output grid, and how it was drawn."""

    tissue: np.ndarray  # uint8 (Z, H, W), atlas.TISSUES
    labels: np.ndarray  # uint8 (Z, H, W): 0, 1 kidney, 2 tumor
    affine: np.ndarray  # internal layout voxel -> world mm (RAS)
    spacing: tuple  # (slice mm, row mm, col mm)
    meta: dict = field(default_factory=dict)


def output_affine(spacing: tuple, origin: np.ndarray) -> np.ndarray:
    """KiTS-style affine: axis 0 -> -z (inferior), axis 1 -> -y (posterior), axis 2 -> -x (patient left)."""
    t, p, q = spacing
    aff = np.array([[0, 0, -q, 0], [0, -p, 0, 0], [-t, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    aff[:3, 3] = origin
    return aff


def _grid_world(shape: tuple, affine: np.ndarray, step: tuple) -> tuple[np.ndarray, tuple]:
    """World coordinates (3, z, h, w) of a uniform coarse lattice over an output grid (about every `step`
    voxels, first and last voxels included)."""
    axes = [np.linspace(0, n - 1, max(2, int(np.ceil((n - 1) / s)) + 1)) for n, s in zip(shape, step)]
    kk, ii, jj = np.meshgrid(*axes, indexing="ij")
    vox = np.stack([kk, ii, jj, np.ones_like(kk)])
    world = np.tensordot(affine, vox, axes=1)[:3]
    return world, tuple(len(a) for a in axes)


def _smooth_displacement(rng: np.random.Generator, coarse_shape: tuple, amplitude_mm: float,
                         smooth_px: float) -> np.ndarray:
    """(3, *coarse_shape) smooth random displacement in mm, std about `amplitude_mm`."""
    field_ = rng.standard_normal((3, *coarse_shape))
    for c in range(3):
        field_[c] = ndi.gaussian_filter(field_[c], smooth_px, mode="nearest")
        std = field_[c].std()
        if std > 0:
            field_[c] *= amplitude_mm / std
    field_[0] *= 0.5  # less superior-inferior displacement than in-plane
    return field_


def _upsample_coords(coarse: np.ndarray, shape: tuple) -> np.ndarray:
    """Linear interpolation of a coarse (3, ...) coordinate lattice (:func:`_grid_world`) to the full grid."""
    out = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        out[c] = ndi.zoom(coarse[c].astype(np.float32), [n / m for n, m in zip(shape, coarse.shape[1:])],
                          output=np.float32, order=1, mode="nearest", grid_mode=False)[: shape[0], : shape[1], : shape[2]]
    return out


# --------------------------------------------------------------------------- KiTS kidneys


@dataclass
class KitsKidney:
    """One real kidney (with its tumor) cut out of a KiTS19 label map."""

    labels: np.ndarray  # uint8 crop, 0/1/2
    affine: np.ndarray  # crop voxel -> world mm
    centroid: np.ndarray  # world mm
    side: str
    case_id: str


def _kits_cases(labels_from: Path) -> list[Path]:
    found = sorted(p for p in Path(labels_from).glob(f"case_*/{KITS_SEGMENTATION}") if p.is_file())
    if not found:
        raise QnkitInputError(f"--labels-from {labels_from}: no case_*/{KITS_SEGMENTATION} files")
    return found


@lru_cache(maxsize=8)
def kits_kidneys(path: str) -> tuple[KitsKidney, ...]:
    """The kidneys of one KiTS19 segmentation, split into right and left by their world x (RAS: +x = right).

    Two groups more than 60 mm apart are two kidneys; otherwise the case has one kidney, whose side
    is that of its centre relative to the case's column centre.
    """
    import nibabel as nib

    img = nib.load(path)
    seg = np.asarray(img.dataobj)
    while seg.ndim > 3 and seg.shape[-1] == 1:
        seg = seg[..., 0]
    seg = seg.astype(np.uint8)
    affine = np.asarray(img.affine, dtype=np.float64)
    zs = np.nonzero(seg.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return ()
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    fg = np.argwhere(seg[z0:z1] > 0)
    fg[:, 0] += z0
    world = fg @ affine[:3, :3].T + affine[:3, 3]
    x = world[:, 0]
    order = np.sort(x)
    # Otsu split of the x coordinates (subsampled for speed).
    sample = order[:: max(1, len(order) // 4000)]
    best, split = -1.0, None
    for s in np.quantile(sample, np.linspace(0.1, 0.9, 33)):
        a, b = sample[sample <= s], sample[sample > s]
        if len(a) and len(b):
            var = len(a) * len(b) * (a.mean() - b.mean()) ** 2
            if var > best:
                best, split = var, s
    groups = []
    if split is not None and x[x > split].mean() - x[x <= split].mean() > 60:
        groups = [("right", x > split), ("left", x <= split)]
    else:
        centre_x = (affine @ np.array([*(np.array(seg.shape) - 1) / 2, 1.0]))[0]
        groups = [("right" if x.mean() > centre_x else "left", np.ones(len(x), dtype=bool))]
    out = []
    for side, sel in groups:
        idx = fg[sel]
        lo = np.maximum(idx.min(axis=0) - 2, 0)
        hi = np.minimum(idx.max(axis=0) + 3, seg.shape)
        crop = np.zeros(tuple(hi - lo), dtype=np.uint8)
        rel = idx - lo
        crop[rel[:, 0], rel[:, 1], rel[:, 2]] = seg[idx[:, 0], idx[:, 1], idx[:, 2]]
        caff = affine.copy()
        caff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
        out.append(KitsKidney(crop, caff, world[sel].mean(axis=0), side, Path(path).parent.name))
    return tuple(out)


def _kits_sizes(labels_from: Path) -> dict:
    path = Path(labels_from) / "kits.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(r.get("case_id")): r.get("radiographic_size") for r in records if isinstance(r, dict)}


def _place_kidney(rng: np.random.Generator, kidney: KitsKidney, target: np.ndarray, labels: np.ndarray,
                  affine: np.ndarray) -> np.ndarray:
    """Paint `kidney` into `labels` (output grid) with its centroid at world `target`; returns its mask."""
    angle = np.deg2rad(rng.uniform(-12, 12, size=3))
    rot = _rotation(*angle) * rng.uniform(0.9, 1.12)  # output world offset -> source world offset
    inv_src = np.linalg.inv(kidney.affine)
    # Bounding box of the kidney in output voxels (corners of its crop, mapped forwards).
    corners = np.array([[a, b, c] for a in (0, kidney.labels.shape[0]) for b in (0, kidney.labels.shape[1])
                        for c in (0, kidney.labels.shape[2])], dtype=np.float64)
    cw = corners @ kidney.affine[:3, :3].T + kidney.affine[:3, 3] - kidney.centroid
    cw = cw @ np.linalg.inv(rot).T + target
    inv_out = np.linalg.inv(affine)
    cv = cw @ inv_out[:3, :3].T + inv_out[:3, 3]
    lo = np.maximum(np.floor(cv.min(axis=0)).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(cv.max(axis=0)).astype(int) + 3, labels.shape)
    if np.any(hi <= lo):
        return np.zeros(labels.shape, dtype=bool)
    kk, ii, jj = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij")
    vox = np.stack([kk, ii, jj], axis=-1)
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    src_world = (world - target) @ rot.T + kidney.centroid
    src_vox = src_world @ inv_src[:3, :3].T + inv_src[:3, 3]
    patch = ndi.map_coordinates(kidney.labels, np.moveaxis(src_vox, -1, 0), order=0, mode="constant", cval=0)
    patch = patch.astype(np.uint8)
    region = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    region[patch > 0] = patch[patch > 0]
    mask = np.zeros(labels.shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = patch > 0
    return mask


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _add_cysts(rng: np.random.Generator, labels: np.ndarray, tissue: np.ndarray, spacing: tuple) -> int:
    """Simple renal cysts (spheres bulging from the kidney), labelled kidney as in KiTS19; returns how many."""
    kid = np.argwhere(labels == 1)
    if len(kid) == 0:
        return 0
    n = int(rng.integers(1, 4))
    sp = np.asarray(spacing)
    for _ in range(n):
        c = kid[rng.integers(len(kid))]
        r = rng.uniform(5, 18)
        half = np.ceil(r / sp).astype(int)
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, labels.shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        ball = ((zz - c[0]) * sp[0]) ** 2 + ((yy - c[1]) * sp[1]) ** 2 + ((xx - c[2]) * sp[2]) ** 2 <= r * r
        sub_l = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        sub_t = tissue[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        sub_l[ball & (sub_l == 0)] = 1
        sub_t[ball] = LABEL["kidney_cyst"]
    return n


#: Tissues a moved or enlarged organ may grow into (fat, mesentery, bowel); never bone, lung, vessels,
#: muscle or another solid organ.
_YIELDING = ("body", "stomach", "duodenum", "small_bowel", "colon")
#: Anatomy version 2's organ moves: (organ, the side whose kidney it is pushed towards, shift mm, scale range).
#: Real spleens range from small to splenomegaly and often wrap the upper pole of the left kidney; the
#: liver's right lobe lies on the right kidney. The one atlas body has neither variation.
ORGAN_MOVES = (("spleen", "left", (5.0, 40.0), (0.85, 1.55)),
               ("liver", "right", (0.0, 15.0), (0.92, 1.15)))


def _move_organ(rng: np.random.Generator, tissue: np.ndarray, organ: str, goal: np.ndarray | None, spacing: tuple,
                shift_mm: tuple[float, float], scale: tuple[float, float]) -> dict:
    """Rescale `organ` about its centroid and shift it towards `goal` (a kidney's centre, voxels), in place.

    Where the organ was and no longer is becomes ``body`` (fat); it grows only into :data:`_YIELDING`
    tissues and the atlas kidneys (replaced by real kidneys afterwards, which then lie against it).
    Returns the move (shift in mm, per-axis scale) for the case's record; {} when either is absent.
    """
    label = LABEL[organ]
    yielding = [LABEL[t] for t in (*_YIELDING, "kidney_right", "kidney_left")]
    where = np.argwhere(tissue == label)
    if len(where) == 0 or goal is None:
        return {}
    sp = np.asarray(spacing, dtype=np.float64)
    centre = where.mean(axis=0)
    direction = (np.asarray(goal) - centre) * sp
    direction /= max(float(np.linalg.norm(direction)), 1e-6)
    shift = direction * rng.uniform(*shift_mm) + rng.normal(0.0, 4.0, 3)  # mm, (slice, row, col)
    factor = rng.uniform(*scale) * rng.uniform(0.92, 1.08, 3)
    new_centre = centre + shift / sp
    lo = np.maximum(np.floor(new_centre + (where.min(axis=0) - centre) * factor).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(new_centre + (where.max(axis=0) - centre) * factor).astype(int) + 3, tissue.shape)
    old = tissue == label
    tissue[old] = LABEL["body"]
    if np.all(hi > lo):
        grid = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")
        src = np.stack([(g - new_centre[i]) / factor[i] + centre[i] for i, g in enumerate(grid)])
        moved = ndi.map_coordinates(old.view(np.uint8), src, order=0, mode="constant", cval=0) > 0
        region = tissue[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        region[moved & np.isin(region, yielding)] = label
    return {"shift_mm": np.round(shift, 1).tolist(), "scale": np.round(factor, 3).tolist()}


#: How often anatomy version 3 puts a large mass against a kidney.
MASS_P = 0.3
#: Where the mass sits relative to the kidney (patient axes of the output grid: slice = superior to inferior,
#: row = anterior to posterior, column = right to left), with weights: adrenal and upper-pole masses above,
#: exophytic and retroperitoneal ones in front, beside and below.
_MASS_DIRECTIONS = ((("superior", (-1.0, 0.0, 0.0)), 0.25), (("anterior", (0.0, -1.0, 0.0)), 0.3),
                    (("lateral", (0.0, 0.0, 1.0)), 0.25), (("inferior", (1.0, 0.0, 0.0)), 0.2))
#: Tissues a mass never replaces: it pushes organs and bowel aside, not bone, lung or the kidney itself.
_MASS_SPARES = ("bone", "lung", "spinal_cord", "kidney_right", "kidney_left", "kidney_cyst")


def add_mass(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, spacing: tuple, side: str,
             volume_ml: tuple[float, float] = (250.0, 750.0)) -> dict:
    """Paint a lobulated mass of about `volume_ml` against the `side` kidney, in place.

    The mass takes tissue label ``mass`` and KiTS label 0: in the seed's convention a mass that distorts the
    kidney is not kidney, so the network must learn to stop at the kidney's edge however large and enhancing
    the neighbour is. It overlaps the kidney's outline by a fifth of its radius (pressed against it) but never
    replaces kidney voxels. Returns the record for the case's metadata.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    names = [d for d, _ in _MASS_DIRECTIONS]
    weights = np.array([w for _, w in _MASS_DIRECTIONS])
    name, axis = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    direction = np.array(axis, dtype=np.float64)
    if name == "lateral" and side == "right":
        direction = -direction
    direction = direction + rng.normal(0.0, 0.25, 3)
    direction /= np.linalg.norm(direction)
    volume = float(rng.uniform(*volume_ml))
    radius = (3 * volume * 1000 / (4 * np.pi)) ** (1 / 3)  # mm, of the sphere of that volume
    axes = radius * rng.uniform(0.8, 1.25, 3)
    axes *= radius / np.prod(axes) ** (1 / 3)  # same volume, elongated
    kidney = np.argwhere(tissue == LABEL[f"kidney_{side}"])
    if len(kidney) == 0:
        return {}
    kidney_centre = kidney.mean(axis=0)
    reach = float(((kidney - kidney_centre) * sp @ direction).max())
    centre = kidney_centre + direction * (reach + radius * rng.uniform(0.75, 0.95)) / sp
    half = np.ceil(1.3 * axes.max() / sp).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + half + 1, tissue.shape)
    if np.any(hi <= lo):
        return {}
    zz, yy, xx = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij")
    rel = np.stack([(zz - centre[0]) * sp[0], (yy - centre[1]) * sp[1], (xx - centre[2]) * sp[2]], -1)
    radial = np.sqrt(((rel / axes) ** 2).sum(-1))
    lobes = _smooth_displacement(rng, tuple(max(2, int(np.ceil(n * s / 15.0))) for n, s in zip(hi - lo, sp)),
                                 0.12, smooth_px=1.0)[1]
    lobes = ndi.zoom(lobes, [n / c for n, c in zip(hi - lo, lobes.shape)], order=1)[: hi[0] - lo[0], : hi[1] - lo[1],
                                                                                  : hi[2] - lo[2]]
    inside = radial <= 1.0 + lobes
    region = tissue[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    kits = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    spared = np.isin(region, [LABEL[t] for t in _MASS_SPARES]) | (kits > 0) | (region == LABEL["air"])
    painted = inside & ~spared
    region[painted] = LABEL["mass"]
    return {"side": side, "where": name, "volume_ml": round(float(painted.sum()) * float(np.prod(sp)) / 1000, 1)}


# --------------------------------------------------------------------------- the case


THICKNESSES = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
THICKNESS_P = (0.1, 0.15, 0.15, 0.25, 0.15, 0.2)


def draw_grid(rng: np.random.Generator, pixel_range: tuple[float, float]) -> tuple[float, float]:
    """(in-plane pixel mm, slice thickness mm): pixel size log-uniform in `pixel_range`."""
    lo, hi = pixel_range
    pixel = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    thickness = float(rng.choice(THICKNESSES, p=THICKNESS_P))
    return pixel, thickness


def make_anatomy(rng: np.random.Generator, *, pixel_mm: float, thickness_mm: float, labels_from: Path | None,
                 max_size: int = 512, version: int = 2, mass_rng: np.random.Generator | None = None) -> Anatomy:
    """Draw one body: deformed atlas tissues plus real (or atlas) kidneys on a fresh output grid.

    `version` 1 is the body of the first anatomy recipe (the shipped kidney-synth model's data);
    version 2 also moves and resizes the spleen and liver towards the kidneys (:data:`ORGAN_MOVES`)
    and jitters each kidney's position, so that organs touch the kidneys in many ways, as in patients;
    version 3 also puts a large mass against one kidney in :data:`MASS_P` of the bodies, drawn from
    `mass_rng` (default `rng`): a stream of its own keeps every other draw, and so a body without a mass,
    version 2's.
    """
    atlas, atlas_aff = load_atlas()
    inv_atlas = np.linalg.inv(atlas_aff)
    kid_vox = np.argwhere((atlas == LABEL["kidney_right"]) | (atlas == LABEL["kidney_left"]))
    centre = (atlas_aff @ np.array([*kid_vox.mean(axis=0), 1.0]))[:3]  # between the kidneys (world)

    # Body size and shape: output offset -> atlas offset = A @ offset; A scales by 1/size.
    size = np.array([rng.uniform(0.82, 1.22), rng.uniform(0.8, 1.25), rng.uniform(0.88, 1.12)])  # x, y, z
    rot = _rotation(np.deg2rad(rng.uniform(-4, 4)), np.deg2rad(rng.uniform(-4, 4)), np.deg2rad(rng.uniform(-8, 8)))
    lin = np.diag(1.0 / size) @ rot

    # Field of view: the body's in-plane extent, scaled, plus air and sometimes a cut-off edge.
    body_vox = np.argwhere(atlas[:, :, atlas.shape[2] // 2] > 0)
    extent_x = (body_vox[:, 0].max() - body_vox[:, 0].min()) * atlas_aff[0, 0] * size[0]
    extent_y = (body_vox[:, 1].max() - body_vox[:, 1].min()) * atlas_aff[1, 1] * size[1]
    margin = rng.uniform(-0.06, 0.25) if rng.random() < 0.85 else rng.uniform(-0.25, -0.08)  # < 0: body cut off
    fov = max(extent_x, extent_y) * (1 + 2 * max(margin, -0.25)) + 2 * 25.0
    n = int(np.clip(round(fov / pixel_mm), 64, max_size))
    pixel_mm = fov / n if round(fov / pixel_mm) <= max_size else pixel_mm
    # Slab: the kidneys plus 3..11 cm above and 2.5..9 cm below (each at least 22 slices).
    kz = kid_vox[:, 2]
    kid_top = (atlas_aff @ np.array([0, 0, kz.max(), 1.0]))[2] - centre[2]
    kid_bot = (atlas_aff @ np.array([0, 0, kz.min(), 1.0]))[2] - centre[2]
    above = max(rng.uniform(30, 110), 22 * thickness_mm)
    below = max(rng.uniform(25, 90), 22 * thickness_mm)
    z_top = kid_top * size[2] + above
    z_bot = kid_bot * size[2] - below
    nz = int(np.clip(round((z_top - z_bot) / thickness_mm), 8, 600))
    shift = np.array([rng.uniform(-15, 15), rng.uniform(-20, 10), 0.0])  # body off-centre in the FOV
    origin = np.array([centre[0] + shift[0] + (n - 1) / 2 * pixel_mm,
                       centre[1] + shift[1] + (n - 1) / 2 * pixel_mm,
                       centre[2] + z_top])
    spacing = (thickness_mm, pixel_mm, pixel_mm)
    affine = output_affine(spacing, origin)
    shape = (nz, n, n)

    # Output voxel -> atlas voxel: affine body change plus a smooth elastic displacement.
    step = (max(1, int(round(12 / thickness_mm))), max(1, int(round(12 / pixel_mm))), max(1, int(round(12 / pixel_mm))))
    world, coarse_shape = _grid_world(shape, affine, step)
    offset = world - centre[:, None, None, None]
    src = np.tensordot(lin, offset, axes=1) + centre[:, None, None, None]
    src += _smooth_displacement(rng, coarse_shape, rng.uniform(3, 9), smooth_px=max(1.0, 40 / 12))
    src_vox = np.tensordot(inv_atlas[:3, :3], src, axes=1) + inv_atlas[:3, 3][:, None, None, None]
    coords = _upsample_coords(src_vox, shape)
    tissue = np.empty(shape, dtype=np.uint8)
    for z0 in range(0, nz, 32):  # in slabs: bounded memory
        tissue[z0:z0 + 32] = ndi.map_coordinates(atlas, coords[:, z0:z0 + 32], order=0, mode="constant", cval=0)
    del coords

    labels = np.zeros(shape, dtype=np.uint8)
    meta: dict = {"pixel_mm": round(pixel_mm, 4), "thickness_mm": thickness_mm, "body_size": size.round(3).tolist()}
    centres = {}  # where each atlas kidney lies (output voxels), before any organ moves over it
    for side in ("right", "left"):
        where = np.argwhere(tissue == LABEL[f"kidney_{side}"])
        if len(where):
            centres[side] = where.mean(axis=0)
    if version >= 2:
        meta["organ_moves"] = {organ: _move_organ(rng, tissue, organ, centres.get(toward), spacing, shift, scale)
                               for organ, toward, shift, scale in ORGAN_MOVES}
    absent = None
    r = rng.random()
    if r < 0.08:
        absent = "right"
    elif r < 0.16:
        absent = "left"
    meta["absent_kidney"] = absent
    kits_case = None
    if labels_from is not None:
        cases = _kits_cases(Path(labels_from))
        src_path = cases[int(rng.integers(len(cases)))]
        kidneys = {k.side: k for k in kits_kidneys(str(src_path))}
        kits_case = src_path.parent.name
        meta["source_case"] = kits_case
        meta["radiographic_size"] = _kits_sizes(Path(labels_from)).get(kits_case)
    else:
        kidneys = {}
    for side in ("right", "left"):
        atlas_label = LABEL[f"kidney_{side}"]
        if side not in centres:
            continue
        target = centres[side] @ affine[:3, :3].T + affine[:3, 3]
        if version >= 2:  # kidneys sit higher or lower, nearer or farther from their neighbours
            target = target + np.clip(rng.normal(0.0, (6.0, 6.0, 9.0)), -18.0, 18.0)
        if side == absent:
            tissue[tissue == atlas_label] = LABEL["body"]
            continue
        if side in kidneys:
            tissue[tissue == atlas_label] = LABEL["body"]  # perirenal fat where the atlas kidney was
            mask = _place_kidney(rng, kidneys[side], target, labels, affine)
            tissue[mask] = atlas_label
        else:  # the atlas's own (deformed) kidney
            labels[tissue == atlas_label] = 1
    if rng.random() < 0.25:
        meta["cysts"] = _add_cysts(rng, labels, tissue, spacing)
    mass_rng = rng if mass_rng is None else mass_rng
    if version >= 3 and mass_rng.random() < MASS_P:
        present = [side for side in ("right", "left") if side != absent and side in centres]
        if present:
            side = present[int(mass_rng.integers(len(present)))]
            meta["mass"] = add_mass(mass_rng, tissue, labels, spacing, side)
    return Anatomy(tissue=tissue, labels=labels, affine=affine, spacing=spacing, meta=meta)
