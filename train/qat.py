"""Quantisation-aware fine-tuning: train the network through the INT8 arithmetic its CPU graph will run.

Post-training quantisation of the shipped models keeps the mask only with most of the network's FLOPs left in
float (`export/int8.py`): each k x k convolution's 8-bit input costs a little, and the costs add up. Here the
same convolutions (:func:`int8_candidates`, export's candidates: every k x k convolution but the first,
which reads the raw image) compute during training from fake-quantised operands, as ONNX Runtime's QDQ graph
will: the input and the output per tensor in asymmetric UINT8 over a range that includes zero, the weights
per output channel in symmetric INT8 (:func:`fake_quantise`: quantise, round, dequantise, with the
straight-through gradient inside the range). A few hundred steps at a low learning rate from the trained
weights let the weights settle where rounding costs the mask least; the export's calibration and per-layer
search then find more of the network that keeps the answer in INT8.

Ranges follow PyTorch's QAT default: the moving average (:data:`RANGE_MOMENTUM`) of each batch's minimum and
maximum while training, frozen in evaluation. They are not part of the checkpoint (they restart from the first
batch on a resume); export calibrates its own, MinMax among its choices, and does not equalise the inputs of
a quantisation-aware checkpoint, so that its graph quantises the grid the network learnt. Batch norms run on
their running statistics and do not update them (the exported graph folds them as they are); dropout stays
on. The weights saved are the float weights, so a QAT run's checkpoint exports like any other.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

#: Weight of each new batch in the moving minimum and maximum of a convolution's input.
RANGE_MOMENTUM = 0.01
#: INT8 codes of the weights (symmetric: ONNX Runtime's QInt8 per-channel weights) and UINT8 of the activations.
WEIGHT_RANGE, ACTIVATION_RANGE = (-127, 127), (0, 255)


def int8_candidates(model: nn.Module) -> list[str]:
    """Names of the convolutions export quantises: k x k (not 1 x 1), not the network's first."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [name for position, (name, m) in enumerate(convs) if position > 0 and m.kernel_size != (1, 1)]


def fake_quantise(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """`x` quantised to the integer codes [low, high] (``round(x / scale) + zero``, rounding half to even as ONNX
    Runtime's QuantizeLinear) and dequantised; the gradient passes straight through where no code was clipped.

    Plain element-wise operations rather than ``torch.fake_quantize_*``, whose ATen kernels the compiled step
    cannot fuse with their neighbours."""
    codes = torch.round(x / scale) + zero
    inside = (codes >= low) & (codes <= high)
    dequantised = (torch.clamp(codes, low, high) - zero) * scale
    return dequantised.detach() + (x - x.detach()) * inside


def fake_quantise_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in, kh, kw) through symmetric per-output-channel INT8."""
    w = weight.float()
    scale = (w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / WEIGHT_RANGE[1]).clamp_min(1e-12)
    return fake_quantise(w, scale, torch.zeros_like(scale), *WEIGHT_RANGE).to(weight.dtype)


def activation_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of asymmetric UINT8 over [low, high] widened to include 0 (ONNX Runtime's rule)."""
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    scale = ((high - low) / ACTIVATION_RANGE[1]).clamp_min(1e-8)
    zero = torch.clamp(torch.round(-low / scale), *ACTIVATION_RANGE)
    return scale.reshape(1), zero.reshape(1)


def _observe(low: torch.Tensor, high: torch.Tensor, seen: torch.Tensor, x: torch.Tensor) -> None:
    """Move the range [low, high] towards `x`'s minimum and maximum (the first batch sets it)."""
    with torch.no_grad():
        x_low, x_high = x.detach().min().float(), x.detach().max().float()
        first = seen == 0
        low.copy_(torch.where(first, x_low, low + RANGE_MOMENTUM * (x_low - low)))
        high.copy_(torch.where(first, x_high, high + RANGE_MOMENTUM * (x_high - high)))


def _uint8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    scale, zero = activation_qparams(low, high)
    return fake_quantise(x.float(), scale, zero, *ACTIVATION_RANGE).to(x.dtype)


def _quantised_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The QDQ convolution: UINT8 input, INT8 weights, and the output quantised to UINT8 again (ONNX Runtime's
    QLinearConv writes 8-bit codes; the graph dequantises them for the float operations that follow)."""
    if self.training:
        _observe(self.qat_low, self.qat_high, self.qat_seen, x)
    y = F.conv2d(_uint8(x, self.qat_low, self.qat_high), fake_quantise_weight(self.weight), self.bias, self.stride,
                 self.padding, self.dilation, self.groups)
    if self.training:
        _observe(self.qat_out_low, self.qat_out_high, self.qat_seen, y)
        self.qat_seen.add_(1)
    return _uint8(y, self.qat_out_low, self.qat_out_high)


def _frozen_batchnorm_train(self: nn.BatchNorm2d, mode: bool = True) -> nn.BatchNorm2d:
    return nn.Module.train(self, False)


def quantisation_aware(model: nn.Module) -> list[str]:
    """Make `model` train through INT8 arithmetic in place (see the module docstring); returns the names of the
    fake-quantised convolutions. Its state dict is unchanged (the ranges are non-persistent buffers)."""
    names = int8_candidates(model)
    modules = dict(model.named_modules())
    for name in names:
        conv = modules[name]
        if getattr(conv, "qat_seen", None) is not None:
            continue
        device = conv.weight.device
        for buffer in ("qat_low", "qat_high", "qat_out_low", "qat_out_high"):
            conv.register_buffer(buffer, torch.zeros((), device=device), persistent=False)
        conv.register_buffer("qat_seen", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        conv.forward = types.MethodType(_quantised_forward, conv)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(_frozen_batchnorm_train, module)
            module.eval()
    return names
