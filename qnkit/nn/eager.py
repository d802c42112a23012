"""Eager PyTorch backend for `qnkit.inference.segment_volume`: numpy batch in, probabilities out."""
from __future__ import annotations

import numpy as np
import torch


def make_predict_batch(model: torch.nn.Module, device: str | torch.device = "cpu", amp: bool = False):
    """`predict_batch(x float32 (N,C,h,w), keep=None) -> float32 probabilities (N,1,h,w)` for a logits model
    (C: the network's num_channels).

    The model is put in eval mode on `device`; prediction runs under torch.inference_mode (and
    float16 autocast when `amp` is set and the device is CUDA). `keep`: QuickNAT's Dropout2d masks
    (N, sites, filters), a Monte-Carlo sample (:mod:`qnkit.uncertainty`), as the backends take them.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    use_amp = bool(amp) and device.type == "cuda"

    def predict_batch(x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        inputs = [np.ascontiguousarray(x, dtype=np.float32)] + ([] if keep is None else
                                                                 [np.ascontiguousarray(keep, dtype=np.float32)])
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(*(torch.from_numpy(a).to(device) for a in inputs))
            return torch.sigmoid(logits.float()).cpu().numpy()

    return predict_batch
