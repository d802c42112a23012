"""Synthetic abdominal CT cases in the KiTS19 layout.

Each case is a phantom of an abdomen scanned in the late-arterial / corticomedullary phase,
stored exactly like a real KiTS19 case: ``case_XXXXX/imaging.nii.gz`` (int16 HU) and
``segmentation.nii.gz`` (uint8: 0 background, 1 kidney, 2 tumor), arrays of shape
``(num_slices, size, size)`` with slice 0 the most superior, nibabel axcodes ``('I', 'P', 'L')``
(rows run anterior→posterior, columns run from the patient's right to the patient's left),
affine ``[[0, 0, -px, 0], [0, -px, 0, 0], [-slice_mm, 0, 0, 0], [0, 0, 0, 1]]`` with
sform_code 2 and qform_code 0, like the real headers.

The phantom (all sizes in mm, so a smaller ``size`` gets proportionally larger pixels):

* body: a superellipse with a flatter back, subcutaneous fat (-110..-80 HU) around an
  abdominal-wall muscle layer (40..60 HU); air (-1000 HU) and a CT table outside;
* retroperitoneal / mesenteric fat filling the cavity, bowel loops (enhancing wall; gas,
  fluid or oral contrast up to 400 HU in the lumen), stomach with an air-fluid level;
* liver (60..110 HU, brighter vessels) on the patient's right, gallbladder, spleen
  (90..150 HU, arterial-phase "zebra" texture) on the left, pancreas (80..130 HU);
* lumbar spine: vertebral bodies (cancellous 140..280 HU inside a cortical rim, 500..900 HU)
  with intervertebral discs, spinal canal, neural arch, spinous and transverse processes;
  ribs in the upper slices; psoas and paraspinal muscles;
* aorta (140..350 HU) with iliac bifurcation, IVC, renal arteries and veins;
* two kidneys, 3-D bean shapes ~10..12 cm long, paravertebral, tilted (upper pole medial and
  posterior, hilum facing antero-medially), the right one lower, in perirenal fat; enhancing
  cortex (150..250 HU) with columns of Bertin, darker medulla (30..100 HU), renal sinus fat
  and pelvis; in most cases a tumor (1..8 cm, heterogeneous, sometimes necrotic) growing from
  one kidney, labelled 2.

The volume is smoothed with a small Gaussian (partial-volume blur) before Gaussian noise
(sigma 10..25 HU) is added. The HU ranges deliberately overlap (cortex vs aorta, cancellous
bone, oral contrast, spleen and pancreas; medulla and tumor vs liver and muscle), so a fixed
HU window does not segment the kidneys; their shape, texture and position do.

With ``labels_from`` the kidney and tumor masks are real KiTS19 label arrays (resampled
in-plane to ``size`` by block majority, or nearest neighbour when the factor is not an
integer), with the real slice count and spacing, and the anatomy is built around them.

Every case is seeded from ``(seed, index)`` only: the same seed, size and index give the same
bytes, whatever the number of cases asked for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from qnkit.errors import QnkitInputError

__all__ = ["SynthCase", "make_case", "resample_labels"]

IMAGING_NAME = "imaging.nii.gz"
SEGMENTATION_NAME = "segmentation.nii.gz"
#: Anatomy phantoms (version 5 on): the background voxels training may weigh as hard negatives (train/data.py).
HARD_NEGATIVES_NAME = "hard_negatives.nii.gz"
KITS_JSON = "kits.json"

#: Slice thicknesses (mm) and their probabilities; thicker slices are used when the slice
#: count would exceed `max_slices(size)`.
SLICE_THICKNESSES = (1.0, 2.5, 3.0, 5.0)
_THICKNESS_P = (0.15, 0.2, 0.25, 0.4)
HU_MIN, HU_MAX = -1024, 3071
#: NIfTI header `descrip` of the files written here; files without it are never overwritten.
DESCRIP = b"qnkit synth"
_KIDNEY_SIDES = ("both", "left", "right")


def max_slices(size: int) -> int:
    """Most slices a synthetic (not --labels-from) case of this in-plane size gets."""
    return max(32, int(0.3 * size))


@dataclass
class SynthCase:
    """One synthetic case. Arrays are in the KiTS19 layout (slices, rows, cols)."""

    case_id: str
    imaging: np.ndarray  # int16 (Z, S, S), HU
    segmentation: np.ndarray  # uint8 (Z, S, S), 0 background / 1 kidney / 2 tumor
    affine: np.ndarray  # 4x4 float64, KiTS19 convention
    radiographic_size: float  # cm, largest tumor diameter (0.0 without tumor)
    meta: dict = field(default_factory=dict)  # extra kits.json fields
    tissue: np.ndarray | None = None  # anatomy cases, when asked: the tissue labels it was rendered from
    # anatomy version 5 on: uint8, 1 on background voxels a model must learn to leave out of the kidney (the renal
    # sinus and what leaves the hilum; .hilum.hard_negative_mask); written as hard_negatives.nii.gz
    hard_negatives: np.ndarray | None = None

    def kits_entry(self) -> dict:
        entry = {"case_id": self.case_id, "radiographic_size": self.radiographic_size}
        entry.update(self.meta)
        return entry


# --------------------------------------------------------------------------- validation


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise QnkitInputError(f"size must be an integer, got {size!r}")
    size = int(size)
    if size < 32 or size % 2:
        raise QnkitInputError(f"size must be an even number of pixels >= 32, got {size}")
    if size > 2048:
        raise QnkitInputError(f"size must be at most 2048 pixels, got {size}")
    return size


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QnkitInputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise QnkitInputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_kidneys(kidneys: str) -> str:
    if kidneys not in _KIDNEY_SIDES:
        raise QnkitInputError(f"kidneys must be one of {', '.join(_KIDNEY_SIDES)}, got {kidneys!r}")
    return kidneys


# --------------------------------------------------------------------------- geometry helpers


class _Grid:
    """Voxel grid in the canonical frame: axis 0 inferior (z), 1 posterior (y), 2 patient left (x).

    Coordinates are in mm; z = 0 at slice 0, y and x are 0 at the image centre.
    """

    def __init__(self, shape, spacing):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = np.array(
            [0.0, -(self.shape[1] - 1) / 2 * self.spacing[1], -(self.shape[2] - 1) / 2 * self.spacing[2]]
        )
        self.full = (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    def axis(self, a: int, sl: slice) -> np.ndarray:
        idx = np.arange(sl.start, sl.stop)
        return (self.origin[a] + idx * self.spacing[a]).astype(np.float32)

    def coords(self, box):
        z = self.axis(0, box[0])[:, None, None]
        y = self.axis(1, box[1])[None, :, None]
        x = self.axis(2, box[2])[None, None, :]
        return z, y, x

    def box(self, lo, hi):
        """Index box of the voxels whose centres lie in [lo, hi] (mm, (z, y, x)); None if empty."""
        out = []
        for a in range(3):
            i0 = max(0, int(math.ceil((lo[a] - self.origin[a]) / self.spacing[a] - 1e-6)))
            i1 = min(self.shape[a], int(math.floor((hi[a] - self.origin[a]) / self.spacing[a] + 1e-6)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def grow(self, box, mm: float):
        out = []
        for a in range(3):
            n = int(math.ceil(mm / self.spacing[a]))
            out.append(slice(max(0, box[a].start - n), min(self.shape[a], box[a].stop + n)))
        return tuple(out)

    def to_mm(self, idx) -> np.ndarray:
        return self.origin + np.asarray(idx, dtype=np.float64) * self.spacing


class _Field:
    """Smooth Gaussian random field (std ~1) with correlation length ~`scale` mm.

    Drawn on a coarse lattice and interpolated linearly (deterministic, no BLAS)."""

    def __init__(self, rng: np.random.Generator, grid: _Grid, scale: float):
        self.grid = grid
        self.step = scale / 2.0
        extent = (np.asarray(grid.shape) - 1) * grid.spacing
        n = tuple(int(math.ceil(e / self.step)) + 4 for e in extent)
        c = rng.standard_normal(n).astype(np.float32)
        c = ndi.gaussian_filter(c, 1.2, mode="reflect")
        c /= float(c.std()) + 1e-6
        self.c = c

    def sample(self, box=None) -> np.ndarray:
        box = self.grid.full if box is None else box
        arr = self.c
        for a in (0, 1, 2):  # the last (full-size) pass is the cheapest axis to finish on
            idx = np.arange(box[a].start, box[a].stop)
            p = idx * (self.grid.spacing[a] / self.step) + 1.0
            i0 = np.floor(p).astype(np.intp)
            w = (p - i0).astype(np.float32)
            shape = [1, 1, 1]
            shape[a] = len(idx)
            w = w.reshape(shape)
            out = np.take(arr, i0, axis=a)
            out *= 1 - w
            hi = np.take(arr, i0 + 1, axis=a)
            hi *= w
            out += hi
            arr = out
        return arr


def _paint(hu: np.ndarray, box, mask: np.ndarray, value) -> None:
    """hu[box][mask] = value (a scalar or an array of the box's shape)."""
    if box is None or mask is None:
        return
    sub = hu[box]
    if np.ndim(value) == 0:
        sub[mask] = value
    else:
        sub[mask] = np.broadcast_to(value, mask.shape)[mask]


def _ellipsoid_box(grid: _Grid, center, semi, rot=None, pad: float = 0.0):
    """Index box of a (rotated) ellipsoid; `rot` columns are its axes in (z, y, x)."""
    semi = np.asarray(semi, dtype=np.float64)
    rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    ext = np.sqrt(((rot * semi[None, :]) ** 2).sum(axis=1)) + pad
    center = np.asarray(center, dtype=np.float64)
    return grid.box(center - ext, center + ext)


def _q_in_box(grid: _Grid, box, center, semi, rot=None) -> np.ndarray:
    """Normalised squared radius (<= 1 inside) of an ellipsoid over the voxels of `box`."""
    rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    z, y, x = grid.coords(box)
    dz, dy, dx = z - np.float32(center[0]), y - np.float32(center[1]), x - np.float32(center[2])
    q = None
    for j in range(3):
        u = dz * np.float32(rot[0, j]) + dy * np.float32(rot[1, j]) + dx * np.float32(rot[2, j])
        t = (u / np.float32(semi[j])) ** 2
        q = t if q is None else q + t
    return q


def _ellipsoid_q(grid: _Grid, center, semi, rot=None, pad: float = 0.0):
    """Box and normalised squared radius q (q <= 1 inside) of a (rotated) ellipsoid."""
    box = _ellipsoid_box(grid, center, semi, rot, pad)
    if box is None:
        return None, None
    return box, _q_in_box(grid, box, center, semi, rot)


def _tube(grid: _Grid, points, radius: float):
    """Box and mask of a tube of `radius` mm around a 3-D polyline (list of (z, y, x))."""
    pts = np.asarray(points, dtype=np.float64)
    lo, hi = pts.min(axis=0) - radius, pts.max(axis=0) + radius
    box = grid.box(lo, hi)
    if box is None:
        return None, None
    z, y, x = grid.coords(box)
    mask = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    r2 = np.float32(radius * radius)
    for p0, p1 in zip(pts[:-1], pts[1:]):
        seg = p1 - p0
        ll = float(seg @ seg)
        if ll == 0:
            continue
        dz, dy, dx = z - np.float32(p0[0]), y - np.float32(p0[1]), x - np.float32(p0[2])
        t = (dz * np.float32(seg[0]) + dy * np.float32(seg[1]) + dx * np.float32(seg[2])) / np.float32(ll)
        t = np.clip(t, 0, 1)
        d2 = (dz - t * np.float32(seg[0])) ** 2 + (dy - t * np.float32(seg[1])) ** 2 + (dx - t * np.float32(seg[2])) ** 2
        mask |= d2 <= r2
    return box, mask


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _bbox(mask: np.ndarray):
    """Index box of the True voxels of a 3-D mask, or None."""
    out = []
    for a in range(3):
        other = tuple(b for b in range(3) if b != a)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        out.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


# --------------------------------------------------------------------------- body


@dataclass
class _Body:
    cx: float  # centre (mm)
    cy: float
    a: float  # lateral semi-axis
    b: float  # antero-posterior semi-axis
    p_post: float  # superellipse exponent of the (flatter) back
    t_lat: float  # subcutaneous fat
    t_ant: float
    t_post: float
    wall: float  # abdominal wall muscle
    scale: np.ndarray  # per-slice size factor

    def level(self, name: str):
        if name == "outer":
            return self.cx, self.cy, self.a, self.b
        cy = self.cy + (self.t_ant - self.t_post) / 2
        a = self.a - self.t_lat
        b = self.b - (self.t_ant + self.t_post) / 2
        if name == "inner":
            return self.cx, cy, a, b
        return self.cx, cy, a - self.wall, b - self.wall  # "cavity"

    def mask(self, grid: _Grid, box, name: str) -> np.ndarray:
        cx, cy, a, b = self.level(name)
        _, y, x = grid.coords(box)
        s = self.scale[box[0]][:, None, None].astype(np.float32)
        dx = np.abs(x - np.float32(cx)) / (np.float32(a) * s)
        dy = (y - np.float32(cy)) / (np.float32(b) * s)
        post = dy > 0
        p = np.float32(self.p_post)
        r = np.where(post, dx**p + np.abs(dy) ** p, dx * dx + dy * dy)
        return r <= 1


# --------------------------------------------------------------------------- plans


@dataclass
class _Kidney:
    side: str  # "left" / "right" (patient)
    center: np.ndarray  # (z, y, x) mm
    hilum: np.ndarray
    ztop: float
    zbot: float


@dataclass
class _Plan:
    grid: _Grid
    seg: np.ndarray  # canonical uint8
    body: _Body
    mid_x: float
    spine_y: float
    vb_r: float
    kidneys: dict
    affine: np.ndarray
    flips: tuple  # axes flipped between canonical and output arrays
    radiographic_size: float | None
    meta: dict


def _draw_body(rng):
    bmi = rng.uniform()
    a = rng.uniform(140, 175) + 20 * bmi
    b = min(a * rng.uniform(0.65, 0.8), rng.uniform(100, 135) + 10 * bmi)
    t_lat = 10 + 35 * bmi * rng.uniform(0.6, 1.0)
    t_ant = 8 + 32 * bmi * rng.uniform(0.6, 1.0)
    t_post = 6 + 20 * bmi * rng.uniform(0.6, 1.0)
    wall = rng.uniform(7, 14)
    amp, period, phase = rng.uniform(0, 0.04), rng.uniform(150, 400), rng.uniform(0, 2 * np.pi)
    return dict(a=a, b=b, t_lat=t_lat, t_ant=t_ant, t_post=t_post, wall=wall, p_post=rng.uniform(2.4, 3.2),
                amp=amp, period=period, phase=phase)


def _body_scale(params, nz, dz):
    z = np.arange(nz) * dz
    return (1 + params["amp"] * np.sin(2 * np.pi * z / params["period"] + params["phase"])).astype(np.float32)


def _kidney_frame(side: str, tilt_coronal: float, tilt_sagittal: float, rot_axial: float) -> np.ndarray:
    """Columns: long axis (towards the lower pole), lateral-posterior width axis, AP axis; (z, y, x)."""
    sgn = 1.0 if side == "left" else -1.0
    u = _unit([1.0, -math.tan(tilt_sagittal), sgn * math.tan(tilt_coronal)])
    h = _unit([0.0, -math.sin(rot_axial), -sgn * math.cos(rot_axial)])  # hilum: antero-medial
    h = _unit(h - (h @ u) * u)
    v = -h
    w = np.cross(u, v)
    return np.stack([u, v, w], axis=1)


def _draw_kidney_shapes(rng: np.random.Generator) -> dict:
    """Each kidney's semi-axes, offset from the spine and tilts (mm, radians).

    Drawn for both sides even when only one kidney is kept: the body is sized to hold both."""
    kid = {}
    for side in ("left", "right"):
        sgn = 1.0 if side == "left" else -1.0
        kid[side] = dict(
            semi=(rng.uniform(52, 62), rng.uniform(26, 33), rng.uniform(20, 26)),
            dx=rng.uniform(55, 72),
            dy=rng.uniform(5, 25),
            tc=math.radians(rng.uniform(6, 20)),
            ts=math.radians(rng.uniform(5, 20)),
            ra=math.radians(rng.uniform(15, 45)),
            sgn=sgn,
        )
    return kid


def _field_of_view(rng: np.random.Generator, bp: dict, kid: dict, mid_x: float, size: int):
    """Widen the body to hold the kidneys, choose a field of view around it and place the body in it.

    Adjusts the body's semi-axes in `bp` in place; returns the pixel spacing at `size` and the
    body centre (mm)."""
    # The cavity must hold the kidneys with room for perirenal fat and the flank.
    need = max(k["dx"] + k["semi"][1] for k in kid.values()) + 35 + bp["t_lat"] + bp["wall"] + abs(mid_x)
    bp["a"] = max(bp["a"], need)
    # Field of view: pixel spacing at 512 between 0.6 and 0.95 mm, body inside.
    px512 = float(np.clip((2 * bp["a"] * 1.05 + rng.uniform(20, 120)) / 512, 0.6, 0.95))
    fov = px512 * 512
    bp["a"] = min(bp["a"], fov / 2 / 1.05 - 8)
    bp["b"] = min(bp["b"], fov / 2 / 1.05 - 8)
    px = px512 * 512 / size
    body_cx = rng.uniform(-10, 10)
    body_cy = float(np.clip(rng.uniform(-10, 25), -(fov / 2 - bp["b"] * 1.05 - 4), fov / 2 - bp["b"] * 1.05 - 4))
    return px, body_cx, body_cy


def _craniocaudal_layout(rng: np.random.Generator, kid: dict, size: int):
    """Kidney centre levels (mm below slice 0; the right kidney lower) and the slice thickness and
    count that cover them, thicker slices when the count would exceed `max_slices(size)`."""
    # Left upper pole at m_top, right kidney lower.
    m_top = rng.uniform(30, 80)
    m_bot = rng.uniform(20, 70)
    zc = {}
    zc["left"] = m_top + rng.uniform(0, 10) + kid["left"]["semi"][0] * math.cos(kid["left"]["tc"]) * 0.95
    zc["right"] = zc["left"] + rng.uniform(10, 25)
    coverage = max(zc[s] + kid[s]["semi"][0] for s in zc) + m_bot
    thick = float(rng.choice(SLICE_THICKNESSES, p=_THICKNESS_P))
    cap = max_slices(size)
    if coverage / thick > cap:
        thick = math.ceil(coverage / cap / 0.5) * 0.5
    nz = int(math.ceil(coverage / thick))
    return zc, thick, nz


def _label_kidneys(grid: _Grid, seg: np.ndarray, kid: dict, zc: dict, sides, mid_x: float, spine_y: float):
    """Label (1) each kept kidney in `seg`: a tilted ellipsoid with a hilar notch cut from its
    medial side. Returns the `_Kidney` landmarks and each kidney's (centre, frame, semi-axes),
    on which a tumor is placed."""
    kidneys_out = {}
    frames = {}
    for side in sides:
        k = kid[side]
        center = np.array([zc[side], spine_y + k["dy"], mid_x + k["sgn"] * k["dx"]])
        rot = _kidney_frame(side, k["tc"], k["ts"], k["ra"])
        a_k, b_k, c_k = k["semi"]
        box, q = _ellipsoid_q(grid, center, k["semi"], rot)
        notch_c = center + rot @ np.array([0.0, -b_k, 0.0])
        mask = (q <= 1) & (_q_in_box(grid, box, notch_c, (a_k * 0.35, b_k * 0.45, c_k * 0.55), rot) > 1)
        seg[box][mask] = 1
        frames[side] = (center, rot, np.array(k["semi"]))
        hilum = center + rot @ np.array([0.0, -b_k * 0.8, 0.0])
        kidneys_out[side] = _Kidney(side, center, hilum, center[0] - a_k, center[0] + a_k)
    return kidneys_out, frames


@dataclass
class _TumorDraw:
    present: bool
    side: str
    diam: float  # mm
    u: float  # position on the kidney surface: cosine along the long axis
    phi: float  # and angle around it (radians)
    depth: float  # centre offset along the surface normal, in radii (negative: inside)
    semi_f: np.ndarray  # per-axis semi-axis factors
    rot: np.ndarray
    lobes: list  # (radius factor, direction, offset in radii)


def _draw_tumor(rng: np.random.Generator, sides) -> _TumorDraw:
    """Draw the tumor's presence (80 %), side, size (15..80 mm, log-uniform), position and lobes.

    Everything is drawn whether or not the case has a tumor, so the draw count is fixed."""
    present = rng.uniform() < 0.8
    side = sides[int(rng.integers(len(sides)))]
    diam = math.exp(rng.uniform(math.log(15), math.log(80)))
    u_t = rng.uniform(-0.85, 0.85)
    phi = math.radians(rng.uniform(-120, 120))
    depth = rng.uniform(-0.5, 0.6)
    t_semi_f = rng.uniform(0.85, 1.15, size=3)
    t_rot = _random_rotation(rng)
    n_lobes = int(rng.integers(0, 3))
    lobes = [(rng.uniform(0.4, 0.7), _unit(rng.standard_normal(3)), rng.uniform(0.4, 0.7)) for _ in range(n_lobes)]
    return _TumorDraw(present, side, diam, u_t, phi, depth, t_semi_f, t_rot, lobes)


def _label_tumor(grid: _Grid, seg: np.ndarray, body: _Body, frame, tumor: _TumorDraw, mid_x: float, spine_y: float,
                 vb_r: float) -> None:
    """Label (2) the tumor in `seg`: an ellipsoid plus lobes centred near a point of the kidney's
    surface, clipped to the body's inner wall and kept off the spine."""
    center, rot, semi = frame
    r = tumor.diam / 2
    u_t, phi = tumor.u, tumor.phi
    d = np.array([u_t, math.sqrt(1 - u_t**2) * math.cos(phi), math.sqrt(1 - u_t**2) * math.sin(phi)])
    s = 1.0 / math.sqrt(float(((d / semi) ** 2).sum()))
    surf = d * s
    normal = _unit(surf / semi**2)
    t_center = center + rot @ (surf + normal * r * tumor.depth)
    tmask = np.zeros(grid.shape, dtype=bool)
    box, q = _ellipsoid_q(grid, t_center, r * tumor.semi_f, tumor.rot)
    if box is not None:
        tmask[box] |= q <= 1
    for rf, direction, off in tumor.lobes:
        box, q = _ellipsoid_q(grid, t_center + direction * r * off, (r * rf,) * 3)
        if box is not None:
            tmask[box] |= q <= 1
    tb = _bbox(tmask)
    if tb is not None:
        inner = body.mask(grid, tb, "inner")
        z, y, x = grid.coords(tb)
        spine = (x - np.float32(mid_x)) ** 2 + (y - np.float32(spine_y)) ** 2 <= np.float32((vb_r + 12) ** 2)
        keep = tmask[tb] & inner & ~spine
        seg[tb][keep] = 2


def _synthetic_plan(rng: np.random.Generator, size: int, kidneys: str) -> _Plan:
    """Lay out a fully synthetic case: body, spine, kidneys and tumor (mm), the slice grid that
    covers them and the label array. The draws run in a fixed order that is part of every case's bytes."""
    bp = _draw_body(rng)
    vb_r = rng.uniform(17, 23)
    # Physical layout relative to the body centre (0, 0); shifted into the image below.
    mid_x = rng.uniform(-6, 6)
    spine_y = bp["b"] - bp["t_post"] - rng.uniform(40, 55) - vb_r
    kid = _draw_kidney_shapes(rng)
    px, body_cx, body_cy = _field_of_view(rng, bp, kid, mid_x, size)
    zc, thick, nz = _craniocaudal_layout(rng, kid, size)
    grid = _Grid((nz, size, size), (thick, px, px))
    bp_scale = _body_scale(bp, nz, thick)
    body = _Body(cx=body_cx, cy=body_cy, a=bp["a"], b=bp["b"], p_post=bp["p_post"], t_lat=bp["t_lat"],
                 t_ant=bp["t_ant"], t_post=bp["t_post"], wall=bp["wall"], scale=bp_scale)
    mid_x += body_cx
    spine_y += body_cy

    seg = np.zeros(grid.shape, dtype=np.uint8)
    sides = ("left", "right") if kidneys == "both" else (kidneys,)
    kidneys_out, frames = _label_kidneys(grid, seg, kid, zc, sides, mid_x, spine_y)
    tumor = _draw_tumor(rng, sides)
    if tumor.present:
        _label_tumor(grid, seg, body, frames[tumor.side], tumor, mid_x, spine_y, vb_r)
    meta = {"tumor": bool((seg == 2).any())}
    if tumor.present:
        meta["tumor_side"] = tumor.side
    affine = np.array([[0, 0, -px, 0], [0, -px, 0, 0], [-thick, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return _Plan(grid=grid, seg=seg, body=body, mid_x=mid_x, spine_y=spine_y, vb_r=vb_r, kidneys=kidneys_out,
                 affine=affine, flips=(), radiographic_size=None, meta=meta)


# --------------------------------------------------------------------------- real label geometry


def resample_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Resample a (Z, H, W) label array in-plane to (Z, size, size).

    Block majority when H and W are integer multiples of `size` (ties go to the higher
    label, so tumor beats kidney beats background); nearest neighbour (at pixel centres)
    otherwise."""
    z, h, w = labels.shape
    if h % size == 0 and w % size == 0:
        f, g = h // size, w // size
        if f == 1 and g == 1:
            return np.ascontiguousarray(labels, dtype=np.uint8)
        blk = labels.reshape(z, size, f, size, g)
        c1 = (blk == 1).sum(axis=(2, 4), dtype=np.int32)
        c2 = (blk == 2).sum(axis=(2, 4), dtype=np.int32)
        c0 = f * g - c1 - c2
        out = np.zeros((z, size, size), dtype=np.uint8)
        out[c1 >= c0] = 1
        out[(c2 >= c1) & (c2 >= c0)] = 2
        return out
    ri = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.intp), h - 1)
    ci = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.intp), w - 1)
    return np.ascontiguousarray(labels[:, ri][:, :, ci], dtype=np.uint8)


def _source_cases(labels_from) -> list[Path]:
    root = Path(labels_from)
    if not root.exists():
        raise QnkitInputError(f"--labels-from folder {root} does not exist")
    if not root.is_dir():
        raise QnkitInputError(f"--labels-from {root} is not a folder")
    found = sorted(p for p in root.glob("case_*/" + SEGMENTATION_NAME) if p.is_file())
    if not found:
        raise QnkitInputError(f"--labels-from folder {root} has no case_*/{SEGMENTATION_NAME} files")
    return found


def _kits_sizes(labels_from) -> dict:
    path = Path(labels_from) / KITS_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QnkitInputError(f"cannot read {path}: {exc}") from None
    out = {}
    if isinstance(data, list):
        for entry in data:
            if isinstance(entry, dict) and "case_id" in entry:
                value = entry.get("radiographic_size")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    out[str(entry["case_id"])] = float(value)
    return out


def _load_labels(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise QnkitInputError(f"cannot read {path}: {exc}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise QnkitInputError(f"{path}: expected a 3-D label volume, got shape {data.shape}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise QnkitInputError(f"{path}: labels must be integers")
    if data.size and (data.min() < 0 or data.max() > 2):  # min/max: np.unique sorts 10^8 voxels
        raise QnkitInputError(f"{path}: labels must be 0, 1 or 2, found {np.unique(data).tolist()[:10]}")
    codes = nib.aff2axcodes(img.affine)
    if codes[0] not in ("I", "S") or codes[1] not in ("P", "A") or codes[2] not in ("L", "R"):
        raise QnkitInputError(
            f"{path}: expected the KiTS19 layout (slices, rows, cols) with axcodes like I,P,L; got {','.join(codes)}"
        )
    flips = tuple(a for a, c in enumerate(codes) if c in ("S", "A", "R"))
    return data.astype(np.uint8), np.asarray(img.affine, dtype=np.float64), flips


def _split_sides(seg: np.ndarray, grid: _Grid):
    """Midline x (mm) between the kidneys, from the foreground's distribution over columns."""
    prof = (seg > 0).sum(axis=(0, 1)).astype(np.float64)
    x = grid.axis(2, grid.full[2]).astype(np.float64)
    total = prof.sum()
    if total == 0:
        return 0.0
    # Otsu split of the column positions.
    c = np.cumsum(prof)
    m = np.cumsum(prof * x)
    w0, w1 = c[:-1], total - c[:-1]
    ok = (w0 > 0) & (w1 > 0)
    split = None
    if ok.any():
        mu0 = np.where(ok, m[:-1] / np.maximum(w0, 1), 0)
        mu1 = np.where(ok, (m[-1] - m[:-1]) / np.maximum(w1, 1), 0)
        var = np.where(ok, w0 * w1 * (mu0 - mu1) ** 2, -1)
        i = int(np.argmax(var))
        split = i
    if split is not None:
        frac0 = c[split] / total
        mu0 = m[split] / c[split]
        mu1 = (m[-1] - m[split]) / (total - c[split])
        if 0.15 < frac0 < 0.85 and mu1 - mu0 > 70:
            return float((mu0 + mu1) / 2)
    cen = float((prof * x).sum() / total)
    if cen > 30:
        return cen - 65.0
    if cen < -30:
        return cen + 65.0
    return cen


def _labels_plan(rng: np.random.Generator, src: Path, size: int, kidneys: str, sizes: dict) -> _Plan:
    raw, src_affine, flips = _load_labels(src)
    zc, h, w = raw.shape
    canon = np.flip(raw, axis=flips) if flips else raw
    seg = resample_labels(np.ascontiguousarray(canon), size)
    fh, fw = h / size, w / size
    scale = np.array([[1, 0, 0, 0], [0, fh, 0, (fh - 1) / 2], [0, 0, fw, (fw - 1) / 2], [0, 0, 0, 1]], dtype=np.float64)
    affine = src_affine @ scale
    spacing = np.sqrt((src_affine[:3, :3] ** 2).sum(axis=0)) * np.array([1, fh, fw])
    grid = _Grid(seg.shape, spacing)
    mid_x = _split_sides(seg, grid)
    xs = grid.axis(2, grid.full[2])
    if kidneys != "both":
        keep = xs > mid_x if kidneys == "left" else xs <= mid_x
        seg[:, :, ~keep] = 0
    kid = {}
    for side in ("left", "right"):
        cols = xs > mid_x if side == "left" else xs <= mid_x
        part = np.zeros_like(seg, dtype=bool)
        part[:, :, cols] = seg[:, :, cols] > 0
        if part.sum() < 8:
            continue
        idx = np.argwhere(part)
        cen_i = idx.mean(axis=0)
        center = grid.to_mm(cen_i)
        kz = int(round(cen_i[0]))
        near = idx[np.abs(idx[:, 0] - kz) <= 1]
        near = near[np.abs(grid.to_mm(near)[:, 1] - center[1]) <= 12] if len(near) else near
        if len(near):
            pts = grid.to_mm(near)
            medial_x = pts[:, 2].min() if side == "left" else pts[:, 2].max()
            hilum = np.array([center[0], center[1] - 5, medial_x])
        else:
            hilum = center.copy()
        zr = grid.to_mm(np.array([[idx[:, 0].min(), 0, 0], [idx[:, 0].max(), 0, 0]]))[:, 0]
        kid[side] = _Kidney(side, center, hilum, float(zr[0]), float(zr[1]))
    # Body and spine around the kidneys.
    bp = _draw_body(rng)
    vb_r = rng.uniform(17, 23)
    if kid:
        ky = float(np.mean([k.center[1] for k in kid.values()]))
        spine_y = ky - rng.uniform(5, 20)
    else:
        spine_y = rng.uniform(20, 50)
    fg = np.argwhere(seg > 0)
    if len(fg):
        pts = grid.to_mm(fg)
        lateral = float(np.abs(pts[:, 2] - mid_x).max())
        post = float(pts[:, 1].max())
        ant = float(pts[:, 1].min())
    else:
        lateral, post, ant = 90.0, spine_y + 40, spine_y - 40
    y_post = max(spine_y + vb_r + rng.uniform(40, 55), post + 15) + bp["t_post"]
    b = bp["b"]
    cy = y_post - b
    if cy - b > ant - 60:  # make room in front of the kidneys
        b = (y_post - (ant - 60)) / 2
        cy = y_post - b
    # Keep the body inside the (real) field of view where the kidneys allow it: thinner
    # subcutaneous fat first, as the scanner's FOV would have been chosen to fit the patient.
    half_fov = grid.spacing[2] * (grid.shape[2] - 1) / 2 - abs(mid_x) - 4
    core = lateral + 30 + bp["wall"]
    t_lat = float(np.clip(half_fov - core, 4.0, bp["t_lat"]))
    a = max(min(bp["a"], half_fov), core + t_lat)
    body = _Body(cx=mid_x, cy=cy, a=a, b=b, p_post=bp["p_post"], t_lat=t_lat, t_ant=bp["t_ant"],
                 t_post=bp["t_post"], wall=bp["wall"], scale=_body_scale(bp, grid.shape[0], grid.spacing[0]))
    if kidneys == "both":
        value = sizes.get(src.parent.name)
    else:
        value = None
    meta = {"source_case": src.parent.name, "tumor": bool((seg == 2).any())}
    return _Plan(grid=grid, seg=seg, body=body, mid_x=mid_x, spine_y=spine_y, vb_r=vb_r, kidneys=kid,
                 affine=affine, flips=flips, radiographic_size=value, meta=meta)


# --------------------------------------------------------------------------- rendering


def _q(p: float) -> float:
    return NormalDist().inv_cdf(min(max(p, 1e-4), 1 - 1e-4))


@dataclass
class _Look:
    """Case-level appearance: tissue values (HU), bowel contents and noise level."""

    t: dict  # tissue -> HU
    cortex: float  # renal cortex HU
    medulla: float  # renal medulla HU
    noise_sd: float
    oral_contrast: bool
    f_contrast: float  # share of bowel lumen holding oral contrast
    f_gas: float  # share of bowel lumen holding gas
    lumen_t: float  # bowel-field threshold above which a loop's lumen lies


class _Levels(NamedTuple):
    """Craniocaudal landmarks (mm) the organs are placed by."""

    z_top: float  # top of the kidneys
    z_bot: float  # bottom of the kidneys
    z_right: float  # right kidney centre
    z_left: float  # left kidney centre


def _draw_look(rng: np.random.Generator) -> _Look:
    """Draw the case's tissue values before anything is painted; the aorta and renal veins follow
    the cortex, as they enhance together in the arterial phase."""
    U = rng.uniform
    hu_cortex = U(150, 250)
    hu_medulla = U(30, 100)
    t = dict(
        fat=U(-110, -85), retro=U(-100, -75), muscle=U(40, 60), liver=U(60, 110), spleen=U(90, 150),
        pancreas=U(80, 130), aorta=float(np.clip(hu_cortex + U(-40, 80), 140, 350)), ivc=U(70, 150),
        rvein=float(np.clip(hu_cortex + U(-60, 20), 110, 250)), cancellous=U(140, 280), bone=U(500, 900),
        rib=U(300, 650), disc=U(70, 100), csf=U(0, 15), bowel_wall=U(40, 90), fluid=U(0, 25),
        contrast=U(150, 400), gas=U(-1000, -920), sinus=U(-100, -50), urine=U(0, 25),
        tumor=U(30, 130), necrosis=U(5, 30), gb=U(0, 20), table=U(100, 300),
    )
    noise_sd = U(10, 25)
    oral_contrast = U() < 0.65
    f_contrast = U(0.2, 0.6) if oral_contrast else 0.0
    f_gas = U(0.1, 0.35)
    lumen_t = U(0.0, 0.5)
    return _Look(t, hu_cortex, hu_medulla, noise_sd, oral_contrast, f_contrast, f_gas, lumen_t)


def _kidney_levels(plan: _Plan) -> _Levels:
    """Where the kidneys lie craniocaudally; without a kidney, defaults at 30 % / 70 % of the scan
    and centres 10 mm either side of the middle (the right kidney lower)."""
    grid = plan.grid
    nz = grid.shape[0]
    kz = plan.kidneys
    z_top = min([k.ztop for k in kz.values()], default=nz * grid.spacing[0] * 0.3)
    z_bot = max([k.zbot for k in kz.values()], default=nz * grid.spacing[0] * 0.7)
    z_mid = (z_top + z_bot) / 2
    right = kz.get("right")
    left = kz.get("left")
    zR = right.center[0] if right else z_mid + 10
    zL = left.center[0] if left else z_mid - 10
    return _Levels(z_top, z_bot, zR, zL)


def _paint_table(rng: np.random.Generator, hu: np.ndarray, grid: _Grid, body: _Body, table_hu: float) -> None:
    """CT table below the back (85 % of cases): a curved dense shell around a low-density core."""
    U = rng.uniform
    if U() < 0.85:
        _, y1, x1 = grid.coords(grid.full)
        y_back = body.cy + body.b * float(body.scale.max())
        gap, thick = U(4, 30), U(8, 16)
        curve = U(0.0004, 0.0009)
        ytop = np.float32(y_back + gap) - np.float32(curve) * (x1[0] - np.float32(body.cx)) ** 2  # (1,nx)
        yy = y1[0]  # (ny,1)
        sh = np.float32(max(2.0, float(grid.spacing[1])))
        thick = max(thick, 3 * float(sh))
        shell = ((yy >= ytop) & (yy < ytop + sh)) | ((yy >= ytop + thick - sh) & (yy < ytop + thick))
        core = (yy >= ytop + sh) & (yy < ytop + thick - sh)
        hu[:, core] = -900.0
        hu[:, shell] = table_hu


def _paint_body(rng: np.random.Generator, hu: np.ndarray, grid: _Grid, body: _Body, t: dict):
    """Body layers: subcutaneous fat, abdominal-wall muscle, textured fat filling the cavity.

    Returns the inner (inside the fat) and cavity masks, which bound the organs painted later,
    and the fine texture field (12 mm) that later tissues share."""
    full = grid.full
    outer = body.mask(grid, full, "outer")
    inner = body.mask(grid, full, "inner")
    cavity = body.mask(grid, full, "cavity")
    hu[outer] = t["fat"]
    hu[inner] = t["muscle"]
    tex = _Field(rng, grid, 12.0).sample()
    hu[cavity] = t["retro"] + 12.0 * tex[cavity]
    return inner, cavity, tex


def _paint_bowel(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, cavity: np.ndarray, tex: np.ndarray,
                 look: _Look) -> None:
    """Bowel loops in the anterior cavity and flanks: lumen where a smooth field is high, a thin
    enhancing wall around it, contents (gas / fluid / oral contrast) from a coarser field."""
    U = rng.uniform
    grid, body, t = plan.grid, plan.body, look.t
    ccx, ccy, ca, cb = body.level("cavity")
    smax = float(body.scale.max())
    cbox = grid.box((-1e9, ccy - cb * smax, ccx - ca * smax), (1e9, ccy + cb * smax, ccx + ca * smax))
    f_field = _Field(rng, grid, U(13, 20))
    g_field = _Field(rng, grid, U(30, 50))
    if cbox is None:
        return
    _, yb, xb = grid.coords(cbox)
    spine_y = plan.spine_y
    lim = np.where(np.abs(xb - np.float32(plan.mid_x)) < 50, np.float32(spine_y - 12), np.float32(spine_y + 30))
    region = cavity[cbox] & (yb < lim)
    f = f_field.sample(cbox)
    lumen = region & (f > look.lumen_t)
    wall = region & (f > look.lumen_t - 0.3) & ~lumen
    del f, region
    sub = hu[cbox]
    sub[wall] = t["bowel_wall"]
    g = g_field.sample(cbox)[lumen]
    vals = np.full(g.shape, t["fluid"], dtype=np.float32)
    vals[g > _q(1 - look.f_gas)] = t["gas"]
    if look.oral_contrast:
        vals[g < _q(look.f_contrast)] = t["contrast"]
    vals += 8.0 * tex[cbox][lumen]
    sub[lumen] = vals


def _paint_liver(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, cavity: np.ndarray, t: dict,
                 z_right: float) -> None:
    """Liver on the patient's right (negative x) beside the right kidney, with brighter vessels;
    a gallbladder in 60 % of cases."""
    U = rng.uniform
    grid, mid_x = plan.grid, plan.mid_x
    _, ccy, _, cb = plan.body.level("cavity")
    az = U(90, 130)
    liver_c = (z_right + U(-10, 40) - az, ccy - U(0, 20), mid_x - U(40, 70))
    box, q = _ellipsoid_q(grid, liver_c, (az, U(80, 110), U(90, 120)))
    if box is not None:
        m = (q <= 1) & cavity[box]
        lf = _Field(rng, grid, 10.0).sample(box)
        val = t["liver"] + 6.0 * lf
        val = np.where(np.abs(lf) < 0.12, t["liver"] + U(20, 80), val)
        _paint(hu, box, m, val)
    if U() < 0.6:
        gb_c = (z_right + U(-30, 10), ccy - cb * U(0.3, 0.6), mid_x - U(30, 60))
        box, q = _ellipsoid_q(grid, gb_c, (U(25, 40), U(12, 20), U(12, 20)))
        if box is not None:
            _paint(hu, box, (q <= 1) & cavity[box], t["gb"])


def _paint_spleen(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, cavity: np.ndarray, t: dict,
                  z_left: float) -> None:
    """Spleen on the patient's left, level with or above the left kidney's centre, beside the
    spine's depth, tilted; arterial-phase heterogeneous."""
    U = rng.uniform
    grid, mid_x = plan.grid, plan.mid_x
    _, _, ca, _ = plan.body.level("cavity")
    sp_c = (z_left - U(0, 50), plan.spine_y + U(-10, 15), mid_x + ca - U(30, 45))
    ang = math.radians(U(20, 45))
    rot = np.array([[1, 0, 0], [0, math.cos(ang), -math.sin(ang)], [0, math.sin(ang), math.cos(ang)]])
    box, q = _ellipsoid_q(grid, sp_c, (U(45, 65), U(45, 60), U(25, 35)), rot)
    if box is not None:
        sf = _Field(rng, grid, 9.0).sample(box)
        _paint(hu, box, (q <= 1) & cavity[box], t["spleen"] + U(10, 30) * sf)


def _paint_stomach(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, cavity: np.ndarray, look: _Look,
                   z_left: float) -> None:
    """Stomach (left upper, anterior): a wall, gas above an air-fluid level, fluid or oral contrast below."""
    U = rng.uniform
    grid, t = plan.grid, look.t
    _, ccy, _, cb = plan.body.level("cavity")
    st_c = np.array([z_left - U(30, 80), ccy - cb * U(0.25, 0.5), plan.mid_x + U(30, 60)])
    st_semi = (U(40, 60), U(30, 45), U(40, 55))
    box, q = _ellipsoid_q(grid, st_c, st_semi)
    if box is not None:
        m = (q <= 1) & cavity[box]
        inside = (q <= (1 - 5.0 / min(st_semi)) ** 2) & m
        _paint(hu, box, m, U(50, 90))
        _, yb, _ = grid.coords(box)
        level = st_c[1] - st_semi[1] * U(-0.2, 0.5)
        filling = t["contrast"] if (look.oral_contrast and U() < 0.6) else t["fluid"]
        _paint(hu, box, inside & (yb < level), t["gas"])
        _paint(hu, box, inside & (yb >= level), filling)


def _paint_pancreas(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, cavity: np.ndarray, t: dict,
                    tex: np.ndarray, lv: _Levels) -> None:
    """Pancreas as a tube: head near the duodenum (right), body in front of the aorta, tail to the spleen."""
    U = rng.uniform
    mid_x, spine_y = plan.mid_x, plan.spine_y
    zp = (lv.z_right + lv.z_left) / 2 - U(0, 20)
    ay = spine_y - plan.vb_r
    pts = [(zp + U(5, 20), ay - U(25, 40), mid_x - U(30, 45)), (zp, ay - U(25, 35), mid_x + U(0, 15)),
           (zp - U(10, 25), spine_y - U(0, 20), mid_x + U(60, 80))]
    box, m = _tube(plan.grid, pts, U(9, 14))
    if box is not None:
        _paint(hu, box, m & cavity[box], t["pancreas"] + 6.0 * tex[box])


def _paint_perirenal_fat(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, fgbox, t: dict,
                         tex: np.ndarray) -> None:
    """A fat layer of varying width (4..12 mm) around kidneys and tumor, so that they stand apart
    from the organs painted before; `fgbox` is the box of the labels."""
    if fgbox is None:
        return
    grid = plan.grid
    gbox = grid.grow(fgbox, 20.0)
    dist = ndi.distance_transform_edt(~(plan.seg[gbox] > 0), sampling=grid.spacing)
    width = rng.uniform(4, 12) + 3.0 * _Field(rng, grid, 25.0).sample(gbox)
    fat = (dist > 0) & (dist <= np.maximum(width, 2.0)) & plan.body.mask(grid, gbox, "inner")
    _paint(hu, gbox, fat, t["retro"] + 8.0 * tex[gbox])


def _draw_canal(rng: np.random.Generator, plan: _Plan):
    """Spinal canal behind the vertebral body: (centre row y, radius) in mm; the paraspinal
    muscles and the neural arch are placed from it."""
    y_can_r = rng.uniform(7, 10)
    y_can = plan.spine_y + plan.vb_r + y_can_r + 1
    return y_can, y_can_r


def _paint_spine_muscles(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, inner: np.ndarray, t: dict,
                         tex: np.ndarray, y_can: float, z_top: float) -> None:
    """Paraspinal muscles behind the canal (every slice) and the psoas either side of the
    vertebral bodies, starting below the kidneys' top and widening caudally."""
    U = rng.uniform
    mid_x, spine_y, vb_r = plan.mid_x, plan.spine_y, plan.vb_r
    z1, y1, x1 = plan.grid.coords(plan.grid.full)
    for sgn in (-1, 1):
        ex, ey = mid_x + sgn * U(28, 35), y_can + U(15, 25)
        sa, sb = U(25, 32), U(22, 28)
        m2 = ((x1[0] - np.float32(ex)) / np.float32(sa)) ** 2 + ((y1[0] - np.float32(ey)) / np.float32(sb)) ** 2 <= 1
        m3 = m2[None] & inner
        hu[m3] = t["muscle"] + 5.0 * tex[m3]
    z_ps0 = z_top + U(10, 40)
    r_max = U(18, 28)
    zz = z1[:, 0, 0]
    r_ps = np.where(zz >= z_ps0, 5 + np.clip((zz - z_ps0) / 150.0, 0, 1) * (r_max - 5), 0).astype(np.float32)
    ps_dy = U(-3, 8)
    for sgn in (-1, 1):
        cxz = (np.float32(mid_x) + sgn * (np.float32(vb_r * 1.15 + 2) + 0.9 * r_ps))[:, None, None]
        rr = r_ps[:, None, None]
        m = ((x1 - cxz) ** 2 + (y1 - np.float32(spine_y + ps_dy)) ** 2 <= rr * rr * np.float32(1.0)) & (rr > 0)
        hu[m] = t["muscle"] + 5.0 * tex[m]


def _paint_spine(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, t: dict, tex: np.ndarray,
                 y_can: float, y_can_r: float) -> None:
    """Lumbar spine slice by slice: vertebral bodies (cortical rim, cancellous core) alternating
    with discs, spinal canal, neural arch, spinous and transverse processes on part of each level."""
    U = rng.uniform
    grid, mid_x, spine_y, vb_r = plan.grid, plan.mid_x, plan.spine_y, plan.vb_r
    nz, ny, nx = grid.shape
    z1, y1, x1 = grid.coords(grid.full)
    zz = z1[:, 0, 0]
    period, disc_h, phase = U(28, 34), U(6, 10), U(0, 34)
    zpos = np.mod(zz - phase, period)
    is_disc = zpos < disc_h
    vb_rx = vb_r * 1.15
    x2, y2 = x1[0], y1[0]  # (1,nx), (ny,1)
    rvb = np.sqrt(((x2 - np.float32(mid_x)) / np.float32(vb_rx)) ** 2 + ((y2 - np.float32(spine_y)) / np.float32(vb_r)) ** 2)
    body2 = rvb <= 1
    core2 = rvb <= 1 - 2.0 / vb_r
    can_dist = np.sqrt((x2 - np.float32(mid_x)) ** 2 + (y2 - np.float32(y_can)) ** 2)
    canal2 = can_dist <= y_can_r
    arch2 = (can_dist > y_can_r) & (can_dist <= y_can_r + U(4, 6)) & (y2 > np.float32(spine_y + vb_r * 0.6))
    sp2 = ((x2 - np.float32(mid_x)) / 4.5) ** 2 + ((y2 - np.float32(y_can + y_can_r + 18)) / 16.0) ** 2 <= 1
    tp_x = U(25, 35)
    tp2 = np.zeros((ny, nx), dtype=bool)
    for sgn in (-1, 1):
        tp2 |= ((x2 - np.float32(mid_x + sgn * tp_x)) / 18.0) ** 2 + ((y2 - np.float32(y_can - 2)) / 5.0) ** 2 <= 1
    for k in range(nz):
        sl = hu[k]
        if is_disc[k]:
            sl[body2] = t["disc"]
        else:
            sl[body2] = t["bone"] + 20.0 * tex[k][body2]
            sl[core2] = t["cancellous"] + 20.0 * tex[k][core2]
        sl[arch2] = t["bone"] * 0.8
        sl[canal2] = t["csf"]
        if zpos[k] < period * 0.75:
            sl[sp2] = t["bone"] * 0.7
        if period * 0.25 < zpos[k] < period * 0.55:
            sl[tp2] = t["bone"] * 0.7


def _paint_ribs(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, t: dict, lv: _Levels) -> None:
    """Ribs in the upper slices: short arcs just inside the subcutaneous fat, both sides, every
    18..28 mm down to 25..45 % of the way down the kidneys, each arc's angle shifting slice by slice."""
    U = rng.uniform
    grid = plan.grid
    z1, y1, x1 = grid.coords(grid.full)
    zz = z1[:, 0, 0]
    x2, y2 = x1[0], y1[0]  # (1,nx), (ny,1)
    icx, icy, ia, ib = plan.body.level("inner")
    rho = np.sqrt(((x2 - np.float32(icx)) / np.float32(ia)) ** 2 + ((y2 - np.float32(icy)) / np.float32(ib)) ** 2)
    band = (rho <= 1 - 4.0 / ib) & (rho >= 1 - 12.0 / ib)
    theta_l = np.degrees(np.arctan2((y2 - np.float32(icy)) / np.float32(ib), (x2 - np.float32(icx)) / np.float32(ia)))
    theta_r = np.degrees(np.arctan2((y2 - np.float32(icy)) / np.float32(ib), -(x2 - np.float32(icx)) / np.float32(ia)))
    rib_end = lv.z_top + (lv.z_bot - lv.z_top) * U(0.25, 0.45)
    ribs = []
    z_rib = U(-40, 0)
    while z_rib < rib_end:
        for side_theta in (theta_l, theta_r):
            ribs.append((z_rib + U(-5, 5), U(8, 15), U(-20, 70), U(0.8, 2.0), U(8, 16), side_theta))
        z_rib += U(18, 28)
    for k in range(grid.shape[0]):
        zk = zz[k]
        arcs = None
        for zr, hh, th0, slope, half, theta in ribs:
            if abs(zk - zr) <= hh and zk <= rib_end + 10:
                thc = th0 - slope * (zk - zr)
                m = band & (np.abs(theta - thc) <= half)
                arcs = m if arcs is None else arcs | m
        if arcs is not None:
            hu[k][arcs] = t["rib"]


def _paint_great_vessels(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, t: dict, z_bot: float):
    """Aorta in front of the spine, bifurcating into the iliacs below the kidneys, and the IVC to
    its right through every slice. Returns the aorta's (y, x) centre and radius and the IVC's
    (y, x) centre (mm), which the renal vessels join."""
    U = rng.uniform
    grid, mid_x, spine_y, vb_r = plan.grid, plan.mid_x, plan.spine_y, plan.vb_r
    _, y1, x1 = grid.coords(grid.full)
    x2, y2 = x1[0], y1[0]  # (1,nx), (ny,1)
    r_ao = U(9, 13)
    ao = (spine_y - vb_r - r_ao - U(1, 6), mid_x + U(5, 15))
    z_bif = z_bot + U(0, 40)
    zmax = grid.shape[0] * grid.spacing[0]
    box, m = _tube(grid, [(-10, ao[0], ao[1]), (z_bif, ao[0], ao[1])], r_ao)
    _paint(hu, box, m, t["aorta"])
    if z_bif < zmax:
        for sgn in (-1, 1):
            box, m = _tube(grid, [(z_bif - 5, ao[0], ao[1]), (z_bif + 120, ao[0] + 15, ao[1] + sgn * 70)], r_ao * 0.65)
            _paint(hu, box, m, t["aorta"])
    ivc = (spine_y - vb_r - U(5, 15), mid_x - U(20, 30))
    ivc_semi = (U(11, 15), U(8, 11))
    m2 = ((x2 - np.float32(ivc[1])) / np.float32(ivc_semi[0])) ** 2 + ((y2 - np.float32(ivc[0])) / np.float32(ivc_semi[1])) ** 2 <= 1
    hu[:, m2] = t["ivc"]
    return ao, r_ao, ivc


def _paint_renal_vessels(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, t: dict, ao, r_ao: float,
                         ivc) -> None:
    """Renal arteries from the aorta and renal veins to the IVC, ending at each kidney's hilum
    (the left vein crosses in front of the aorta)."""
    U = rng.uniform
    grid = plan.grid
    for side, k in plan.kidneys.items():
        sgn = 1 if side == "left" else -1
        hz, hy, hx = k.hilum
        way = (hz - 5, hy - 8, hx - sgn * 15)
        box, m = _tube(grid, [(hz - U(5, 15), ao[0], ao[1]), way, (hz, hy, hx + sgn * 5)], U(2.5, 4))
        _paint(hu, box, m, t["aorta"])
        if side == "left":
            vpts = [(hz + 3, hy - 3, hx + 5), (hz + 5, ao[0] - r_ao - 6, ao[1]), (hz + 8, ivc[0], ivc[1])]
        else:
            vpts = [(hz + 3, hy - 3, hx - 5), (hz + 5, ivc[0], ivc[1])]
        box, m = _tube(grid, vpts, U(4, 6))
        _paint(hu, box, m, t["rvein"])


def _kidney_layers(rng: np.random.Generator, val: np.ndarray, side_m: np.ndarray, depth: np.ndarray,
                   kf: np.ndarray, pf: np.ndarray, t_c: float, look: _Look) -> None:
    """Values of one kidney (`side_m`) by depth below its surface: cortex (its own value), then
    medulla broken by columns of Bertin where the texture `kf` is low, then sinus fat with urine
    in the pelvis (where `pf` is high) at the core."""
    U = rng.uniform
    t = look.t
    dmax = float(depth[side_m].max())
    cortex_v = look.cortex + U(-10, 10)
    medulla = side_m & (depth > t_c) & (kf > -0.6)
    sinus = side_m & (depth > max(t_c * 1.5, U(0.55, 0.7) * dmax))
    val[side_m] = cortex_v + 8.0 * kf[side_m]
    val[medulla] = look.medulla + 8.0 * kf[medulla]
    val[sinus] = np.where(pf[sinus] > 0.3, t["urine"], t["sinus"] + 10.0 * kf[sinus])


def _tumor_values(rng: np.random.Generator, val: np.ndarray, tum: np.ndarray, kf: np.ndarray, pf: np.ndarray,
                  t: dict, spacing) -> None:
    """Values of the tumor (`tum`): heterogeneous from two texture fields; a large one (over 12 mm
    deep) has a necrotic core in 60 % of cases."""
    U = rng.uniform
    tdepth = ndi.distance_transform_edt(tum, sampling=spacing)
    tv = t["tumor"] + U(15, 40) * kf + U(10, 30) * pf
    dm = float(tdepth.max())
    if dm > 12 and U() < 0.6:
        nec = tdepth > dm * U(0.4, 0.6)
        tv = np.where(nec & (pf > -0.5), t["necrosis"] + 8.0 * kf, tv)
    val[tum] = tv[tum]


def _paint_kidneys(rng: np.random.Generator, hu: np.ndarray, plan: _Plan, fgbox, look: _Look) -> None:
    """Paint the labelled kidneys (each side in layers) and tumor over everything painted before,
    so that the image agrees with the segmentation; `fgbox` is the box of the labels."""
    if fgbox is None:
        return
    grid, mid_x = plan.grid, plan.mid_x
    kbox = grid.grow(fgbox, 2.0)
    sub = plan.seg[kbox]
    depth = ndi.distance_transform_edt(sub > 0, sampling=grid.spacing)
    kf = _Field(rng, grid, 7.0).sample(kbox)
    pf = _Field(rng, grid, 12.0).sample(kbox)
    t_c = rng.uniform(4, 7) + 0.5 * float(grid.spacing[1:].min())
    _, _, xk = grid.coords(kbox)
    val = np.full(sub.shape, look.cortex, dtype=np.float32) + 8.0 * kf
    kid = sub == 1
    for side_left in (True, False):
        side_m = kid & ((xk > np.float32(mid_x)) if side_left else (xk <= np.float32(mid_x)))
        if side_m.any():
            _kidney_layers(rng, val, side_m, depth, kf, pf, t_c, look)
    tum = sub == 2
    if tum.any():
        _tumor_values(rng, val, tum, kf, pf, look.t, grid.spacing)
    _paint(hu, kbox, sub > 0, val)


def _scan(rng: np.random.Generator, hu: np.ndarray, grid: _Grid, noise_sd: float) -> np.ndarray:
    """What the scanner adds: partial-volume blur (0.7 mm in-plane, kept within 0.5..1 pixel;
    0.4 slice through-plane), Gaussian noise, then rounding and clipping to int16 HU."""
    sig_xy = float(np.clip(0.7 / grid.spacing[1], 0.5, 1.0))
    hu = ndi.gaussian_filter(hu, sigma=(0.4, sig_xy, sig_xy), truncate=3.0)
    hu += noise_sd * rng.standard_normal(hu.shape, dtype=np.float32)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16)


def _render(rng: np.random.Generator, plan: _Plan) -> np.ndarray:
    """Paint the plan's phantom in HU: int16, canonical orientation, the labels' grid.

    Each step draws from `rng` in turn and later steps paint over earlier ones, so the order of
    the steps below (and of the draws within them) is part of every case's bytes."""
    grid = plan.grid
    look = _draw_look(rng)
    t = look.t
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    _paint_table(rng, hu, grid, plan.body, t["table"])
    inner, cavity, tex = _paint_body(rng, hu, grid, plan.body, t)
    _paint_bowel(rng, hu, plan, cavity, tex, look)
    lv = _kidney_levels(plan)
    _paint_liver(rng, hu, plan, cavity, t, lv.z_right)
    _paint_spleen(rng, hu, plan, cavity, t, lv.z_left)
    _paint_stomach(rng, hu, plan, cavity, look, lv.z_left)
    _paint_pancreas(rng, hu, plan, cavity, t, tex, lv)
    fgbox = _bbox(plan.seg > 0)
    _paint_perirenal_fat(rng, hu, plan, fgbox, t, tex)
    y_can, y_can_r = _draw_canal(rng, plan)
    _paint_spine_muscles(rng, hu, plan, inner, t, tex, y_can, lv.z_top)
    _paint_spine(rng, hu, plan, t, tex, y_can, y_can_r)
    _paint_ribs(rng, hu, plan, t, lv)
    ao, r_ao, ivc = _paint_great_vessels(rng, hu, plan, t, lv.z_bot)
    _paint_renal_vessels(rng, hu, plan, t, ao, r_ao, ivc)
    _paint_kidneys(rng, hu, plan, fgbox, look)
    return _scan(rng, hu, grid, look.noise_sd)


# --------------------------------------------------------------------------- measurements


def tumor_diameter_cm(segmentation: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance (cm) between two tumor (label 2) voxel centres; 0.0 without tumor."""
    tm = np.asarray(segmentation) == 2
    box = _bbox(tm)
    if box is None:
        return 0.0
    tm = tm[box]
    if tm.sum() > 2000:  # only the surface matters
        tm = tm & ~ndi.binary_erosion(tm, border_value=0)
    idx = np.argwhere(tm) + np.array([b.start for b in box])
    pts = idx @ np.asarray(affine, dtype=np.float64)[:3, :3].T
    if len(pts) > 3000:
        from scipy.spatial import ConvexHull

        try:
            pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
        except Exception:  # noqa: BLE001 - degenerate hull: subsample instead
            pts = pts[:: max(1, len(pts) // 3000)]
    if len(pts) < 2:
        return 0.0
    from scipy.spatial.distance import pdist

    return round(float(pdist(pts).max()) / 10.0, 2)


# --------------------------------------------------------------------------- public API


def make_case(
    index: int,
    *,
    size: int = 512,
    seed: int = 0,
    labels_from: Path | None = None,
    kidneys: str = "both",
) -> SynthCase:
    """Generate case number `index` (id ``case_{index:05d}``).

    `kidneys` ("both", "left" or "right", patient sides) keeps only that kidney.
    With `labels_from`, case `index` takes its kidney/tumor masks from the folder's
    ``case_*/segmentation.nii.gz`` number ``index % count`` (sorted by name)."""
    index = _check_int("index", index, 0)
    size = _check_size(size)
    seed = _check_int("seed", seed, 0)
    kidneys = _check_kidneys(kidneys)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if labels_from is None:
        plan = _synthetic_plan(rng, size, kidneys)
    else:
        sources = _source_cases(labels_from)
        plan = _labels_plan(rng, sources[index % len(sources)], size, kidneys, _kits_sizes(labels_from))
    imaging = _render(rng, plan)
    seg = plan.seg
    if plan.flips:
        imaging = np.flip(imaging, axis=plan.flips)
        seg = np.flip(seg, axis=plan.flips)
    imaging = np.ascontiguousarray(imaging, dtype=np.int16)
    seg = np.ascontiguousarray(seg, dtype=np.uint8)
    if plan.radiographic_size is not None:
        size_cm = float(plan.radiographic_size)
    else:
        size_cm = tumor_diameter_cm(seg, plan.affine)
    meta = dict(plan.meta)
    meta.update(
        synthetic=True,
        seed=seed,
        size=size,
        kidneys=kidneys,
        slice_thickness=round(float(plan.grid.spacing[0]), 4),
        pixel_spacing=round(float(plan.grid.spacing[2]), 6),
        num_slices=int(seg.shape[0]),
    )
    return SynthCase(
        case_id=f"case_{index:05d}",
        imaging=imaging,
        segmentation=seg,
        affine=plan.affine,
        radiographic_size=size_cm,
        meta=meta,
    )
