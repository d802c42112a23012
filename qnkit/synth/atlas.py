"""The anatomical atlas: one real body's organ layout as a single tissue-label volume.

The shipped atlas (``data/s0011_abdomen.nii.gz``) is built by :func:`build_atlas` from the 117
organ masks of TotalSegmentator subject s0011 (Wasserthal et al., Radiology: AI 2023, CC BY 4.0),
cropped to the trunk from the pelvis to the lung bases and merged into the tissue classes of
:data:`TISSUES` (what the renderer gives one appearance). ``body`` marks what lies inside the
trunk's outline but has no organ label (visceral fat, mesentery, abdominal wall), so that the
renderer can put fat, muscle and skin around it.

Rebuild it with ``python -m qnkit.synth.atlas /path/to/s0011 qnkit/synth/data/s0011_abdomen.nii.gz``.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Tissue classes, in label order (0 is air outside the body).
TISSUES = (
    "air", "body", "kidney_right", "kidney_left", "kidney_cyst", "liver", "spleen", "pancreas", "gallbladder",
    "stomach", "duodenum", "small_bowel", "colon", "adrenal", "artery", "vein", "portal_vein", "heart", "lung",
    "bone", "cartilage", "spinal_cord", "muscle", "bladder", "prostate", "esophagus",
    "mass",  # a large retroperitoneal mass against a kidney (anatomy version 3); never in the atlas
    "renal_sinus",  # fat, pelvis and vessels in the kidney's hilum (anatomy version 5, .sinus); never in the atlas
    "collecting_system",  # renal pelvis outside the kidney and ureter (anatomy version 6, .hilum); never in the atlas
    "renal_pelvis",  # the pelvis inside the sinus (anatomy version 7, .hilum.fill_pelvis); never in the atlas
)
LABEL = {name: i for i, name in enumerate(TISSUES)}

ATLAS_PATH = Path(__file__).with_name("data") / "s0011_abdomen.nii.gz"

_MASK_TISSUE = {
    "kidney_right": "kidney_right", "kidney_left": "kidney_left", "liver": "liver", "spleen": "spleen",
    "pancreas": "pancreas", "gallbladder": "gallbladder", "stomach": "stomach", "duodenum": "duodenum",
    "small_bowel": "small_bowel", "colon": "colon", "heart": "heart", "atrial_appendage_left": "heart",
    "urinary_bladder": "bladder", "prostate": "prostate", "esophagus": "esophagus", "spinal_cord": "spinal_cord",
    "aorta": "artery", "inferior_vena_cava": "vein", "portal_vein_and_splenic_vein": "portal_vein",
    "pulmonary_vein": "vein", "superior_vena_cava": "vein", "costal_cartilages": "cartilage",
}
_PREFIX_TISSUE = (
    ("adrenal_gland_", "adrenal"), ("kidney_cyst_", "kidney_cyst"), ("iliac_artery_", "artery"),
    ("iliac_vena_", "vein"), ("lung_", "lung"), ("vertebrae_", "bone"), ("rib_", "bone"), ("sacrum", "bone"),
    ("hip_", "bone"), ("femur_", "bone"), ("sternum", "bone"), ("scapula_", "bone"), ("clavicula_", "bone"),
    ("humerus_", "bone"), ("autochthon_", "muscle"), ("iliopsoas_", "muscle"), ("gluteus_", "muscle"),
    ("subclavian_artery_", "artery"), ("common_carotid_artery_", "artery"), ("brachiocephalic_trunk", "artery"),
    ("brachiocephalic_vein_", "vein"),
)
# Painted in this order, so later tissues win where masks overlap (kidneys and cysts last).
_PAINT_ORDER = ("body", "muscle", "bone", "cartilage", "lung", "heart", "colon", "small_bowel", "duodenum",
                "stomach", "esophagus", "liver", "spleen", "pancreas", "gallbladder", "bladder", "prostate",
                "adrenal", "artery", "vein", "portal_vein", "spinal_cord", "kidney_right", "kidney_left",
                "kidney_cyst")


def tissue_of(mask_name: str) -> str | None:
    """Tissue class of a TotalSegmentator mask name (None: not used, e.g. brain, skull)."""
    if mask_name in _MASK_TISSUE:
        return _MASK_TISSUE[mask_name]
    for prefix, tissue in _PREFIX_TISSUE:
        if mask_name.startswith(prefix):
            return tissue
    return None


def _body_outline(labels: np.ndarray, radius_px: int) -> np.ndarray:
    """Per axial slice: the filled, closed outline of everything labelled (the trunk without its wall)."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[-radius_px:radius_px + 1, -radius_px:radius_px + 1]
    disk = (yy ** 2 + xx ** 2) <= radius_px ** 2
    out = np.zeros(labels.shape, dtype=bool)
    for k in range(labels.shape[2]):
        sl = labels[:, :, k] > 0
        if sl.any():
            padded = np.pad(sl, radius_px + 1)
            closed = ndi.binary_closing(padded, structure=disk)[radius_px + 1:-radius_px - 1, radius_px + 1:-radius_px - 1]
            out[:, :, k] = ndi.binary_fill_holes(closed)
    return out


def build_atlas(mask_dir: str | Path, out: str | Path, margin_mm: tuple[float, float] = (110.0, 130.0)) -> Path:
    """Merge a TotalSegmentator mask folder into one tissue-label NIfTI cropped around the kidneys.

    `margin_mm` is how far below and above the kidneys the crop reaches (pelvis, lung bases).
    """
    import nibabel as nib

    mask_dir = Path(mask_dir)
    files = sorted(mask_dir.glob("*.nii.gz"))
    ref = nib.load(str(files[0]))
    labels = np.zeros(ref.shape, dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    for f in files:
        tissue = tissue_of(f.name[: -len(".nii.gz")])
        if tissue is None:
            continue
        m = np.asarray(nib.load(str(f)).dataobj) > 0
        masks[tissue] = masks.get(tissue, np.zeros(ref.shape, dtype=bool)) | m
    union = np.zeros(ref.shape, dtype=bool)
    for m in masks.values():
        union |= m
    spacing = np.sqrt((ref.affine[:3, :3] ** 2).sum(axis=0))
    kidneys = masks["kidney_right"] | masks["kidney_left"]
    kz = np.nonzero(kidneys.any(axis=(0, 1)))[0]
    z0 = max(0, int(kz.min() - margin_mm[0] / spacing[2]))
    z1 = min(ref.shape[2], int(kz.max() + margin_mm[1] / spacing[2]) + 1)
    masks["body"] = _body_outline(union[:, :, z0:z1].astype(np.uint8), int(round(15.0 / spacing[0])))
    for tissue in _PAINT_ORDER:
        if tissue in masks:
            m = masks[tissue] if tissue == "body" else masks[tissue][:, :, z0:z1]
            labels[:, :, z0:z1][m] = LABEL[tissue]
    labels = labels[:, :, z0:z1]
    inplane = np.nonzero(labels.any(axis=2))
    i0, i1 = max(0, inplane[0].min() - 4), inplane[0].max() + 5
    j0, j1 = max(0, inplane[1].min() - 4), inplane[1].max() + 5
    labels = np.ascontiguousarray(labels[i0:i1, j0:j1])
    affine = ref.affine.copy()
    affine[:3, 3] = ref.affine[:3, :3] @ np.array([i0, j0, z0]) + ref.affine[:3, 3]
    img = nib.Nifti1Image(labels, affine)
    img.header["descrip"] = b"qnkit atlas: TotalSegmentator s0011 (CC BY 4.0)"
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out))
    return out


@lru_cache(maxsize=2)
def load_atlas(path: str | Path = ATLAS_PATH) -> tuple[np.ndarray, np.ndarray]:
    """(tissue labels uint8 (X, Y, Z) in RAS voxel order, affine voxel -> world mm)."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.uint8)), np.asarray(img.affine, dtype=np.float64)


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    print(build_atlas(sys.argv[1], sys.argv[2]))
