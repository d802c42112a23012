"""On-the-fly augmentation of training slices: what differs between scanners, patients and protocols.

Phantoms fix a body, a look and a grid per case; each time a slice is read, :class:`Augment`
changes what a 2-D network should not depend on: in-plane scale, rotation and position (patient
size and placement), contrast, brightness and gamma inside the HU window (phase, calibration),
blur and lost resolution (reconstruction kernel, thick pixels brought up to the model grid), and
noise (dose). Geometry moves image, target and loss weights together; intensity changes touch
only the image. A 2.5-D model's image is its C context planes: every plane gets the same geometric
and intensity change (one slab of tissue moved and imaged alike), noise is drawn per plane.

With ``crop`` > 0 each slice becomes a ``crop`` x ``crop`` window instead (the network is fully
convolutional, so it trains on windows and predicts whole slices): centred on a kidney pixel with
probability ``crop_kidney_p``, else on any pixel of the body (the liver, spleen and bowel around the
kidneys are the negatives that matter). The window is sampled in the same single ``grid_sample`` as
the scale and rotation, so cropping costs nothing and the augmentation runs on the small window.
A window reaching past the slice gets image 0 (the padding value) and loss weight 0 there. Random numbers come from torch's generator, which the solver seeds per epoch
(and DataLoader per worker), so a run and its resumption see the same slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _u(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _hit(p: float) -> bool:
    return float(torch.rand(())) < p


@dataclass(frozen=True)
class Augment:
    """Random changes applied to one padded slice (image (C, h, w), target and weights (1, h, w)) float32."""

    p_geometry: float = 0.8
    scale: tuple = (0.85, 1.18)
    rotate_deg: float = 15.0
    shift: float = 0.06  # fraction of the slice
    p_intensity: float = 0.8
    contrast: tuple = (0.85, 1.15)
    brightness: float = 0.06
    gamma: tuple = (0.7, 1.4)
    p_blur: float = 0.25
    blur_sigma: tuple = (0.4, 1.2)
    p_lowres: float = 0.25
    lowres: tuple = (1.2, 2.2)
    p_noise: float = 0.5
    noise_std: tuple = (0.005, 0.04)
    crop: int = 0  # window side in pixels; 0 = the whole slice
    crop_kidney_p: float = 0.67
    body_level: float = 0.05  # scaled intensity above which a pixel is body (-170 HU in the -200..400 window)

    @classmethod
    def crop_only(cls, crop: int, kidney_p: float = 0.67) -> "Augment":
        """Windows without random scale, rotation or intensity changes ([TRAINING] augment = false)."""
        return cls(p_geometry=0.0, p_intensity=0.0, p_blur=0.0, p_lowres=0.0, p_noise=0.0, crop=crop,
                   crop_kidney_p=kidney_p)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple:
        if self.crop:
            x, y, w = self._window(x, y, w)
        elif _hit(self.p_geometry):
            x, y, w = self._geometry(x, y, w)
        if _hit(self.p_intensity):
            x = (x * _u(*self.contrast) + _u(-self.brightness, self.brightness)).clamp(0, 1)
            x = x.pow(_u(*self.gamma))
        if _hit(self.p_lowres):
            h, wd = x.shape[-2:]
            f = _u(*self.lowres)
            small = F.interpolate(x[None], size=(max(1, round(h / f)), max(1, round(wd / f))), mode="area")
            x = F.interpolate(small, size=(h, wd), mode="bilinear", align_corners=False)[0]
        if _hit(self.p_blur):
            x = _gaussian_blur(x, _u(*self.blur_sigma))
        if _hit(self.p_noise):
            x = (x + torch.randn(x.shape) * _u(*self.noise_std)).clamp(0, 1)
        return x.contiguous(), y.contiguous(), w.contiguous()

    def window_centre(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(row, column) of the window's centre: a kidney pixel (jittered by up to a quarter window) with
        probability ``crop_kidney_p`` when the slice has kidney, else a body pixel (of the centre plane: the
        slice itself), else anywhere."""
        h, wd = x.shape[-2:]
        kidney = torch.nonzero(y[0] >= 0.5) if _hit(self.crop_kidney_p) else y.new_zeros((0, 2), dtype=torch.long)
        if len(kidney):
            r, c = kidney[int(torch.randint(len(kidney), ()))].tolist()
            j = self.crop / 4
            return r + _u(-j, j), c + _u(-j, j)
        body = torch.nonzero(x[x.shape[0] // 2] > self.body_level)
        if len(body):
            r, c = body[int(torch.randint(len(body), ()))].tolist()
            return float(r), float(c)
        return _u(0, h - 1), _u(0, wd - 1)

    def _window(self, x, y, w):
        """The ``crop`` x ``crop`` window around :meth:`window_centre`, scaled and rotated with
        probability ``p_geometry``; one bilinear sample for image and target, nearest for weights."""
        h, wd = x.shape[-2:]
        row, col = self.window_centre(x, y)
        s, a = 1.0, 0.0
        if _hit(self.p_geometry):
            s, a = _u(*self.scale), math.radians(_u(-self.rotate_deg, self.rotate_deg))
        half = self.crop / 2
        # Window pixel offsets (normalised to +-1 over the window) -> input normalised coordinates
        # (align_corners=False: pixel p of n sits at (2p + 1) / n - 1).
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64) / s
        linear = torch.diag(torch.tensor([2.0 / wd, 2.0 / h], dtype=torch.float64)) @ rot * half
        shift = torch.tensor([(2 * col + 1) / wd - 1, (2 * row + 1) / h - 1], dtype=torch.float64)
        theta = torch.cat([linear, shift[:, None]], 1).float()[None]
        grid = F.affine_grid(theta, [1, 1, self.crop, self.crop], align_corners=False)
        return _sample(x, y, w, grid)

    def _geometry(self, x, y, w):
        s = _u(*self.scale)
        a = math.radians(_u(-self.rotate_deg, self.rotate_deg))
        tx, ty = _u(-self.shift, self.shift) * 2, _u(-self.shift, self.shift) * 2
        # Output -> input sampling (normalised coordinates): rotate and shrink by 1/s.
        theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, tx],
                              [math.sin(a) / s, math.cos(a) / s, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, *x.shape[-2:]], align_corners=False)
        return _sample(x, y, w, grid)


def _sample(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, grid: torch.Tensor) -> tuple:
    """Image planes (C, h, w) and target (1, h, w) sampled bilinearly, weights (1, h, w) nearest, at `grid`
    (1, h', w', 2): one geometric transform for every plane, target and weights alike."""
    planes = torch.cat([x, y], 0)[:, None]  # each plane its own batch item: the same grid, the same arithmetic
    xy = F.grid_sample(planes, grid.expand(len(planes), -1, -1, -1), mode="bilinear", padding_mode="zeros",
                       align_corners=False)
    w2 = F.grid_sample(w[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return xy[:-1, 0], xy[-1], w2[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    planes = x[:, None]  # (C, 1, h, w): each plane blurred alike
    out = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return out[:, 0]
