"""Tissue labels -> a CT image in HU: tissue values, inner structure, body wall, scanner effects.

:func:`render` paints every tissue with its case value (:mod:`.appearance`) plus smooth texture,
builds what a label map does not hold (renal cortex, medulla and sinus; tumor necrosis; bowel
wall and lumen contents; cortical bone rims; abdominal wall, subcutaneous fat and skin; the CT
table), then applies what the scanner adds: partial-volume blur, edge-enhancing or smooth
reconstruction kernels, correlated noise, a HU offset and the reconstruction circle.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .appearance import Look
from .atlas import LABEL

_PLAIN = {  # atlas tissue -> appearance tissue, painted as is
    "liver": "liver", "spleen": "spleen", "pancreas": "pancreas", "gallbladder": "gallbladder",
    "adrenal": "adrenal", "artery": "artery", "vein": "vein", "portal_vein": "portal_vein", "heart": "heart",
    "lung": "lung", "cartilage": "cartilage", "spinal_cord": "spinal_cord", "muscle": "muscle",
    "bladder": "bladder", "prostate": "prostate", "esophagus": "esophagus", "kidney_cyst": "cyst",
    "collecting_system": "urine", "renal_pelvis": "urine",
}
_BOWEL = ("stomach", "duodenum", "small_bowel", "colon")


def smooth_field(rng: np.random.Generator, shape: tuple, spacing: tuple, scale_mm: float) -> np.ndarray:
    """Unit-variance random field, float32, smooth over about `scale_mm` (white noise, upsampled)."""
    coarse = tuple(max(2, int(np.ceil(n * s / scale_mm)) + 2) for n, s in zip(shape, spacing))
    noise = ndi.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7)
    out = ndi.zoom(noise, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
    out = out[: shape[0], : shape[1], : shape[2]]
    if out.shape != tuple(shape):
        out = np.pad(out, [(0, n - m) for n, m in zip(shape, out.shape)], mode="edge")
    std = float(out.std())
    out -= out.mean()
    out /= std if std > 0 else 1.0
    return out


def _depth_mm(mask: np.ndarray, spacing: tuple, cap_mm: float | None = None) -> np.ndarray:
    """Distance (mm) from each voxel of `mask` to the outside, computed on the mask's bounding box.

    With `cap_mm` only depths up to it are needed (larger ones come back as `cap_mm`), so the
    transform runs on slabs of slices with a margin of `cap_mm` above and below, each exact up to the
    cap: bone and bowel span the whole body, and one transform of their box (a float64 distance and
    three int32 indices per voxel) peaked at 3.8 GB on a 512 x 512 x 325 case.
    """
    out = np.zeros(mask.shape, dtype=np.float32)
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return out
    lo, hi = np.maximum(idx.min(axis=0) - 1, 0), idx.max(axis=0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    if cap_mm is None:
        out[box] = ndi.distance_transform_edt(mask[box], sampling=spacing)
        return out
    part, depth = mask[box], out[box]
    halo = int(np.ceil(cap_mm / spacing[0])) + 1
    step = max(8, (1 << 21) // max(1, part.shape[1] * part.shape[2]))
    for start in range(0, part.shape[0], step):
        stop = min(part.shape[0], start + step)
        a, b = max(0, start - halo), min(part.shape[0], stop + halo)
        d = ndi.distance_transform_edt(part[a:b], sampling=spacing)[start - a:stop - a]
        np.minimum(d, cap_mm, out=d)
        depth[start:stop] = d
    return out


def _inplane_distance_mm(outside: np.ndarray, spacing: tuple, resolution_mm: float = 4.0) -> np.ndarray:
    """Per slice: distance (mm) from each `outside` voxel to the nearest non-outside voxel of its slice.

    Computed on a grid of about `resolution_mm` and interpolated back: the body wall it shapes is
    smoothed over centimetres anyway, and the transform is the costliest step of a case.
    """
    f = max(1, int(round(resolution_mm / spacing[1])))
    coarse = outside[:, ::f, ::f]
    d = ndi.distance_transform_edt(coarse, sampling=(1e6, spacing[1] * f, spacing[2] * f)).astype(np.float32)
    if f == 1:
        return d
    out = ndi.zoom(d, (1, outside.shape[1] / d.shape[1], outside.shape[2] / d.shape[2]), order=1, grid_mode=True,
                   mode="nearest")
    return out[:, : outside.shape[1], : outside.shape[2]]


def render(rng: np.random.Generator, tissue: np.ndarray, labels: np.ndarray, spacing: tuple, look: Look) -> np.ndarray:
    """HU image (int16, same shape) of a tissue-label volume with KiTS labels (for kidney and tumor)."""
    shape = tissue.shape
    hu = look.hu
    img = np.full(shape, hu["gas"], dtype=np.float32)
    f1 = smooth_field(rng, shape, spacing, rng.uniform(6, 14))
    f2 = smooth_field(rng, shape, spacing, rng.uniform(15, 40))

    def paint(mask, name, field=f1):
        img[mask] = hu[name] + look.texture_hu[name] * field[mask]

    # Body wall around the trunk: muscle, subcutaneous fat (thicker in front or at the sides), skin.
    # The distance is measured from a smoothed outline: a real abdomen is rounder than its organs.
    body = tissue > 0
    signed = _inplane_distance_mm(~body, spacing) - _inplane_distance_mm(body, spacing)
    d = ndi.gaussian_filter(signed, (0, 12 / spacing[1], 12 / spacing[2]))
    del signed
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (np.argwhere(body.any(axis=0)).mean(axis=0) if body.any() else (ny / 2, nx / 2))
    theta = np.arctan2(yy - cy, xx - cx)
    wall = rng.uniform(3, 10)
    fat = rng.uniform(4, 40) * (1 + rng.uniform(0, 0.6) * np.cos(theta - rng.uniform(-np.pi, np.pi)))
    skin = rng.uniform(1.5, 3.0)
    outside = ~body & (d > 0)
    paint(outside & (d <= wall), "muscle")
    paint(outside & (d > wall) & (d <= wall + fat[None]), "fat", f2)
    paint(outside & (d > wall + fat[None]) & (d <= wall + fat[None] + skin), "skin")

    # Inside the trunk, unlabelled: visceral fat with soft-tissue strands (vessels, mesentery, bowel).
    core = (tissue == LABEL["body"]) | (~body & (d <= 0))
    paint(core, "visceral_fat", f2)
    strands = core & (f1 > np.quantile(f1, 1 - rng.uniform(0.08, 0.3)))
    paint(strands, "soft_tissue")
    del d, core, strands

    for atlas_name, look_name in _PLAIN.items():
        m = tissue == LABEL[atlas_name]
        if m.any():
            paint(m, look_name)

    # Bone: cortical rim, cancellous inside.
    bone = tissue == LABEL["bone"]
    if bone.any():
        depth = _depth_mm(bone, spacing, cap_mm=5.0)  # compared with the rim (<= 2.5 mm) only
        rim = rng.uniform(1.2, 2.5)
        paint(bone & (depth <= rim), "cortical")
        paint(bone & (depth > rim), "cancellous")
        del depth
    del bone

    # Bowel: enhancing wall, lumen of gas, fluid, feces or positive oral contrast.
    f3 = smooth_field(rng, shape, spacing, rng.uniform(8, 20))
    bowel = np.isin(tissue, [LABEL[o] for o in _BOWEL])
    bowel_depth = _depth_mm(bowel, spacing, cap_mm=5.0)  # compared with the wall (<= 3.5 mm) only
    wall_mm = rng.uniform(1.5, 3.5)
    for organ in _BOWEL:
        m = tissue == LABEL[organ]
        if not m.any():
            continue
        lumen = m & (bowel_depth > wall_mm)
        paint(m & ~lumen, "bowel_wall")
        weights = {"gas": look.gas, "fluid": 1.0, "oral_contrast": look.oral_contrast,
                   "feces": 1.2 if organ == "colon" else 0.05}
        names = [k for k, v in weights.items() if v > 0]
        p = np.array([weights[k] for k in names])
        cuts = np.quantile(f3[lumen], np.cumsum(p / p.sum())[:-1]) if lumen.any() else []
        which = np.searchsorted(cuts, f3[lumen]) if lumen.any() else np.zeros(0, dtype=int)
        vals = np.array([hu[k] for k in names], dtype=np.float32)[which]
        tex = np.array([look.texture_hu[k] for k in names], dtype=np.float32)[which]
        img[lumen] = vals + tex * f1[lumen]
    del f3, bowel, bowel_depth

    _paint_kidneys(rng, img, tissue, labels, spacing, look, f1, f2)
    _paint_mass(rng, img, tissue, look, f1, f2)

    if look.table:
        _paint_table(rng, img, body, spacing, hu["table"])

    # Scanner: partial volume, kernel, noise, offset, reconstruction circle. The painting fields are
    # dropped first and the scanner works in place: a 512 x 512 x 325 case at 0.7 mm peaked at 3.9 GB.
    del f1, f2
    ndi.gaussian_filter(img, (look.blur_slices, look.blur_px, look.blur_px), output=img)
    if look.sharpen > 0:
        detail = ndi.gaussian_filter(img, (0, 1.0, 1.0))
        np.subtract(img, detail, out=detail)
        detail *= np.float32(look.sharpen)
        img += detail
        del detail
    noise = _white_noise(rng, shape)
    if look.noise_grain_px > 0:
        ndi.gaussian_filter(noise, (0, look.noise_grain_px, look.noise_grain_px), output=noise)
        noise /= max(float(noise.std()), 1e-6)
    noise *= np.float32(look.noise_hu)
    noise += np.float32(look.hu_offset)
    img += noise
    del noise
    if look.circle:
        r = min(ny, nx) / 2
        img[:, (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > r * r] = look.outside_value
    np.rint(img, out=img)
    np.clip(img, -3024, 3071, out=img)
    return img.astype(np.int16)


def _white_noise(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """``rng.standard_normal(shape).astype(np.float32)``, drawn a few slices at a time (the same numbers:
    the generator's stream does not depend on how it is split), never holding the float64 volume."""
    out = np.empty(shape, dtype=np.float32)
    step = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        out[start:start + step] = rng.standard_normal((min(step, shape[0] - start), *shape[1:]))
    return out


def _paint_kidneys(rng, img, tissue, labels, spacing, look: Look, f1, f2) -> None:
    """Cortex, medulla (pyramids between columns of Bertin), sinus fat and pelvis; tumor with necrosis."""
    hu = look.hu
    _paint_hilar_sinus(img, tissue == LABEL["renal_sinus"], hu, f1, f2)
    carved = np.isin(tissue, [LABEL["renal_sinus"], LABEL["renal_pelvis"]])  # the whole sinus, pelvis and all
    kidney = (labels == 1) & (tissue != LABEL["kidney_cyst"])
    if kidney.any():
        depth = _depth_mm(labels > 0, spacing)
        cortex = kidney & ((depth <= look.cortex_mm) | (f1 > 1.0))
        img[cortex] = hu["cortex"] + look.texture_hu["cortex"] * f1[cortex]
        medulla = kidney & ~cortex
        img[medulla] = hu["medulla"] + look.texture_hu["medulla"] * f1[medulla]
        # With a carved sinus (version 5) the old one is not painted, but its draws are taken as version 4
        # takes them (from the uncarved kidney), so that the rest of the image keeps version 4's numbers.
        whole_depth = _depth_mm((labels > 0) | carved, spacing) if carved.any() else depth
        whole = (kidney | carved) & (tissue != LABEL["kidney_cyst"])
        deep = float(np.quantile(whole_depth[whole], 0.9))
        if rng.random() < 0.75 and deep > look.cortex_mm:
            reach = max(look.cortex_mm + 2, deep * rng.uniform(0.8, 1.0))
            if not carved.any():
                sinus = kidney & (depth > reach)
                fat_part = sinus & (f2 > 0)
                img[fat_part] = hu["sinus_fat"] + 10 * f1[fat_part]
                img[sinus & ~fat_part] = hu["urine"] + 10 * f1[sinus & ~fat_part]
    tumor = labels == 2
    if tumor.any():
        img[tumor] = hu["tumor"] + look.texture_hu["tumor"] * f1[tumor]
        necrosis = tumor & (f2 < -rng.uniform(0.3, 1.5))
        img[necrosis] = hu["necrosis"] + 8 * f1[necrosis]


def _paint_hilar_sinus(img, sinus, hu, f1, f2) -> None:
    """The carved renal sinus (anatomy version 5): fat, the pelvis (urine, or contrast in the excretory
    phase) where the coarse field is high, and vessel strands where the fine one is."""
    if not sinus.any():
        return
    img[sinus] = hu["sinus_fat"] + 10 * f1[sinus]
    pelvis = sinus & (f2 > 0.3)
    img[pelvis] = hu["urine"] + 10 * f1[pelvis]
    vessels = sinus & ~pelvis & (f1 > 1.0)
    img[vessels] = hu["vein"] + 10 * f2[vessels]


def _paint_mass(rng, img, tissue, look: Look, f1, f2) -> None:
    """A large mass (anatomy version 3): solid, heterogeneous and enhancing like a renal tumor of the case's
    phase give or take, with necrosis; random numbers are drawn only when there is one, so cases without a
    mass keep the bytes of earlier versions."""
    mass = tissue == LABEL["mass"]
    if not mass.any():
        return
    hu = look.hu["tumor"] + rng.uniform(-30, 40)
    texture = rng.uniform(10, 35)
    if look.mass_hu is not None:  # a look-alike (version 4): the draws above are kept, so the rest stays
        hu, texture = look.mass_hu, look.mass_texture_hu
    img[mass] = hu + texture * f1[mass]
    necrosis = mass & (f2 < -rng.uniform(0.2, 1.2))
    img[necrosis] = look.hu["necrosis"] + 8 * f1[necrosis]


def _paint_table(rng, img, body, spacing, value) -> None:
    """A CT table: a curved plate some centimetres behind the patient's back."""
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    if rows.size == 0:
        return
    ny, nx = img.shape[1:]
    back = rows.max() + int(rng.uniform(5, 40) / spacing[1])
    thick = max(1, int(rng.uniform(6, 15) / spacing[1]))
    xx = np.arange(nx)
    curve = (((xx - nx / 2) / (nx / 2)) ** 2 * rng.uniform(0, 20) / spacing[1]).astype(int)
    for j in range(nx):
        r0 = back - curve[j]
        if 0 <= r0 < ny:
            img[:, r0:min(ny, r0 + thick), j] = value
