"""QuickNAT (Roy et al., 2018) as in the QuickNAT_pytorch / nn-common-modules reference.

Layout (F = ``num_filters``, k = ``pool``)::

    x -> enc1 -> pool -> enc2 -> pool -> enc3 -> pool -> enc4 -> pool -> bottleneck
      -> unpool, cat(skip4, .) -> dec4 -> ... -> unpool, cat(skip1, .) -> dec1 -> 1x1 conv

Dense block (in -> F channels)::

    o1 = conv_kxk(PReLU(BN(in)));  o2 = conv_kxk(PReLU(BN(cat(in, o1))))
    out = conv_1x1(PReLU(BN(cat(in, o1, o2))))  -> SE (optional) -> Dropout2d (optional)

As in the reference, each dense block shares one PReLU, the channel SE squeezes by 2,
CSSE = element-wise max of channel SE and spatial SE, the skip tensor is the encoder
block output after SE and dropout, and the bottleneck is a plain dense block (the
reference builds SE layers for it but never applies them, nor dropout).

The network returns logits (N, num_class, H, W); :meth:`QuickNAT.predict_proba` and
:class:`WithSigmoid` apply the sigmoid. H and W must be divisible by ``pool ** 4``.

Unpooling has two interchangeable forms with identical outputs for identical weights
(see :mod:`qnkit.nn.unpool`): ``"indices"`` (native MaxPool/MaxUnpool; use for training)
and ``"mask"`` (plain ONNX operators, no MaxUnpool/ScatterND; use for export, NaN-free
activations only). Switch with ``model.set_unpool("mask")``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import SE_BLOCKS, QuickNATConfig
from .unpool import first_max_masks, is_tracing, unpool_masked

__all__ = [
    "SE_BLOCKS", "UNPOOL_MODES", "QuickNATConfig", "QuickNAT", "WithSigmoid", "DenseBlock",
    "ChannelSELayer", "SpatialSELayer", "ChannelSpatialSELayer", "INPUT_PLANE_TENSORS", "inflate_input_planes",
    "widen_filters",
]

UNPOOL_MODES = ("indices", "mask")

#: The tensors whose size depends on the input's plane count: the first encoder block's three batch norms and
#: three convolutions, which read the input concatenated with the block's features (cat(x, o1, ...)), so the
#: input's planes come first along their channel axis (dim 0 of a batch norm's vectors, dim 1 of a conv weight).
INPUT_PLANE_TENSORS = tuple(f"encoders.0.batchnorm{i}.{field}" for i in (1, 2, 3)
                            for field in ("weight", "bias", "running_mean", "running_var")) + \
    tuple(f"encoders.0.conv{i}.weight" for i in (1, 2, 3))


class ChannelSELayer(nn.Module):
    """Channel squeeze & excitation (Hu et al.): x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""

    def __init__(self, num_channels: int, reduction_ratio: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(num_channels, num_channels // reduction_ratio)
        self.fc2 = nn.Linear(num_channels // reduction_ratio, num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * w[:, :, None, None]


class SpatialSELayer(nn.Module):
    """Spatial squeeze & excitation (Roy et al.): x * sigmoid(conv1x1(x) -> 1 channel)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(num_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class ChannelSpatialSELayer(nn.Module):
    """Concurrent SE (CSSE): element-wise max of channel SE and spatial SE."""

    def __init__(self, num_channels: int, reduction_ratio: int = 2):
        super().__init__()
        self.cSE = ChannelSELayer(num_channels, reduction_ratio)
        self.sSE = SpatialSELayer(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.cSE(x), self.sSE(x))


def _se_layer(kind: str, channels: int) -> nn.Module:
    return {"NONE": nn.Identity, "CSE": ChannelSELayer, "SSE": SpatialSELayer,
            "CSSE": ChannelSpatialSELayer}[kind](*(() if kind == "NONE" else (channels,)))


class DenseBlock(nn.Module):
    """QuickNAT dense block ``in_channels -> num_filters``, then optional SE and Dropout2d."""

    def __init__(self, in_channels: int, cfg: QuickNATConfig, se_block: str, drop_out: float):
        super().__init__()
        nf, kernel = cfg.num_filters, (cfg.kernel_h, cfg.kernel_w)
        pad = (cfg.kernel_h // 2, cfg.kernel_w // 2)
        self.batchnorm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, nf, kernel, padding=pad)
        self.batchnorm2 = nn.BatchNorm2d(in_channels + nf)
        self.conv2 = nn.Conv2d(in_channels + nf, nf, kernel, padding=pad)
        self.batchnorm3 = nn.BatchNorm2d(in_channels + 2 * nf)
        self.conv3 = nn.Conv2d(in_channels + 2 * nf, nf, 1)
        self.prelu = nn.PReLU()  # one slope shared by the three activations, as in the reference
        self.se = _se_layer(se_block, nf)
        self.drop_out = nn.Dropout2d(drop_out) if drop_out > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(self.prelu(self.batchnorm1(x)))
        c1 = torch.cat((x, o1), dim=1)
        o2 = self.conv2(self.prelu(self.batchnorm2(c1)))
        c2 = torch.cat((c1, o2), dim=1)
        out = self.conv3(self.prelu(self.batchnorm3(c2)))
        return self.drop_out(self.se(out))


class QuickNAT(nn.Module):
    """QuickNAT returning logits (N, num_class, H, W).

    ``config``: a :class:`QuickNATConfig`, a dict for :meth:`QuickNATConfig.from_dict`, or None
    (defaults). ``unpool``: ``"indices"`` (native, default) or ``"mask"`` (export-friendly).
    """

    def __init__(self, config: QuickNATConfig | Mapping[str, Any] | None = None, *,
                 unpool: str = "indices"):
        super().__init__()
        if config is None:
            config = QuickNATConfig()
        elif not isinstance(config, QuickNATConfig):
            config = QuickNATConfig.from_dict(config)
        self.config = cfg = config
        nf, se, p = cfg.num_filters, cfg.se_block, cfg.drop_out
        self.encoders = nn.ModuleList(
            DenseBlock(cfg.num_channels if i == 0 else nf, cfg, se, p) for i in range(4))
        self.bottleneck = DenseBlock(nf, cfg, "NONE", 0.0)
        # decoders[0] is the deepest (applied first); input = cat(skip, unpooled)
        self.decoders = nn.ModuleList(DenseBlock(2 * nf, cfg, se, p) for _ in range(4))
        self.classifier = nn.Conv2d(nf, cfg.num_class, cfg.kernel_c, padding=cfg.kernel_c // 2)
        self.set_unpool(unpool)
        self._init_weights()

    def _init_weights(self) -> None:
        for block in [*self.encoders, self.bottleneck, *self.decoders]:
            for conv in (block.conv1, block.conv2, block.conv3):  # each follows BN -> PReLU(0.25)
                nn.init.kaiming_normal_(conv.weight, a=0.25, nonlinearity="leaky_relu")
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def unpool(self) -> str:
        return self._unpool

    def set_unpool(self, mode: str) -> "QuickNAT":
        """Use ``"indices"`` (MaxPool/MaxUnpool) or ``"mask"`` (export-friendly); returns self.

        Forward outputs are identical; train with ``"indices"`` (faster, and on tied maxima the
        mask form's pooling gradient is split among the tied positions instead of going to the
        first one).
        """
        if mode not in UNPOOL_MODES:
            raise ValueError(f"unpool must be one of {UNPOOL_MODES}, got {mode!r}")
        self._unpool = mode
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is (N, num_channels, H, W) with H, W multiples of the divisor."""
        d, c = self.config.size_divisor, self.config.num_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % d or x.shape[3] % d:
            raise ValueError(
                f"QuickNAT expects input (N, {c}, H, W) with H and W divisible by {d}, "
                f"got {tuple(x.shape)}")

    @property
    def dropout_sites(self) -> int:
        """Dense blocks that end in Dropout2d (4 encoders + 4 decoders; the bottleneck has none)."""
        return len(self.encoders) + len(self.decoders)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x``; ``keep`` (N, dropout_sites, num_filters), when given, multiplies each dense
        block's output channels (encoders first, then decoders deepest first) as that block's Dropout2d
        would with the same mask: 0 for a dropped channel, 1/(1-p) for a kept one (Monte-Carlo dropout
        with masks drawn outside the network, so every backend draws the same samples for one seed;
        all ones is the eval-mode network). Call it on an eval-mode model."""
        if not is_tracing():
            self.check_input(x)
        k, mask = self.config.pool, self._unpool == "mask"
        skips, keys = [], []
        for site, enc in enumerate(self.encoders):
            x = enc(x)
            if keep is not None:
                x = x * keep[:, site, :, None, None]
            skips.append(x)
            if mask:
                x, key = first_max_masks(x, k)
            else:
                x, key = F.max_pool2d(x, k, k, return_indices=True)
            keys.append(key)
        x = self.bottleneck(x)
        for site, (dec, skip, key) in enumerate(zip(self.decoders, reversed(skips), reversed(keys)),
                                                start=len(self.encoders)):
            if mask:
                up = unpool_masked(x, key, k)
            else:
                up = F.max_unpool2d(x, key, k, k, output_size=skip.shape[-2:])
            x = dec(torch.cat((skip, up), dim=1))
            if keep is not None:
                x = x * keep[:, site, :, None, None]
        return self.classifier(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the logits (per-channel probabilities)."""
        return torch.sigmoid(self(x))


class WithSigmoid(nn.Module):
    """Wraps a logits model so that its output (e.g. an exported graph's) is sigmoid(logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


def inflate_input_planes(state: Mapping[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """The weights of a one-plane (2-D) QuickNAT for the same network taking `channels` input planes (odd;
    the centre one the slice itself), computing exactly what the 2-D network computes at start.

    In each tensor of :data:`INPUT_PLANE_TENSORS` the source's input channel becomes the centre plane; the
    other planes get zero convolution weights (they add nothing) and the centre's batch-norm statistics and
    affine (they are normalised like the slice, so training starts from a sensible scale). The block's own
    feature channels follow, as they were. Every other tensor is the source's.
    """
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f"input planes must be a positive odd number, got {channels}")
    if state["encoders.0.conv1.weight"].shape[1] != 1:
        raise ValueError(f"inflation starts from a one-plane network, got "
                         f"{state['encoders.0.conv1.weight'].shape[1]} input planes")
    out = dict(state)
    for name in INPUT_PLANE_TENSORS:
        source = state[name]
        dim = 1 if name.endswith(("conv1.weight", "conv2.weight", "conv3.weight")) else 0
        slice_plane = source.narrow(dim, 0, 1)
        other = torch.zeros_like(slice_plane) if dim == 1 else slice_plane
        planes = [other] * (channels // 2) + [slice_plane] + [other] * (channels // 2)
        out[name] = torch.cat([*planes, source.narrow(dim, 1, source.shape[dim] - 1)], dim=dim).contiguous()
    return out


def widen_filters(state: Mapping[str, torch.Tensor], config: QuickNATConfig, num_filters: int,
                  noise: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of `config`'s QuickNAT widened to `num_filters` filters per convolution, computing exactly
    what the narrower network computes (Net2WiderNet, Chen et al. 2016): a fine-tuning run gets more capacity
    without losing what the narrower model learnt.

    New filter j copies old filter ``j mod F`` (every conv, batch-norm and SE vector that belongs to it); the
    weights that read a copied channel share the old weight among its copies, so the sum, and with it every
    output, is unchanged. The shares are not equal: each copy gets ``w / copies + e`` with the ``e`` of one
    channel's copies summing to zero (``noise`` x the tensor's standard deviation), which keeps the output
    exact and lets the copies learn apart (with equal shares they would get equal gradients for ever).
    The channel SE's hidden layer (F / 2 units) is widened the same way.
    """
    old = config.num_filters
    if num_filters < old:
        raise ValueError(f"widening goes from {old} filters to more, got {num_filters}")
    gen = torch.Generator().manual_seed(seed)
    copy_of = torch.arange(num_filters) % old
    hidden_old = old // 2
    hidden_copy_of = torch.arange(num_filters // 2) % hidden_old if hidden_old else None

    def produce(t: torch.Tensor, mapping=copy_of) -> torch.Tensor:
        return t.index_select(0, mapping).contiguous()

    def old_positions(segments: list) -> torch.Tensor:
        """For each position of a widened input axis, the old position it copies: the axis is a concatenation
        of segments, ('fixed', n) kept as it is, ('wide', mapping) widened by `mapping`."""
        index, start = [], 0
        for kind, arg in segments:
            index.append(start + (torch.arange(arg) if kind == "fixed" else arg))
            start += arg if kind == "fixed" else int(arg.max()) + 1
        return torch.cat(index)

    def spread(v: torch.Tensor, segments: list) -> torch.Tensor:
        """A per-input-channel vector (batch norm): each copy gets its channel's value."""
        return v.index_select(0, old_positions(segments)).contiguous()

    def consume(w: torch.Tensor, segments: list, dim: int = 1) -> torch.Tensor:
        """Weights reading a widened axis along `dim`: each copy gets its share of the old weight (a channel
        not copied keeps it whole, and no noise: its zero-sum is zero)."""
        index = old_positions(segments)
        shape = [1] * w.dim()
        shape[dim] = -1
        copies = torch.bincount(index, minlength=w.shape[dim]).to(w.dtype).view(shape)
        new = w.index_select(dim, index) / copies.index_select(dim, index)
        if noise > 0 and w.numel() > 1:
            e = torch.randn(new.shape, generator=gen, dtype=w.dtype) * (noise * float(w.std()))
            sums = torch.zeros_like(w).index_add_(dim, index, e)  # zero-sum over each channel's copies
            new = new + e - (sums / copies).index_select(dim, index)
        return new.contiguous()

    wide = ("wide", copy_of)
    blocks = [(f"encoders.{i}", [("fixed", config.num_channels)] if i == 0 else [wide]) for i in range(4)]
    blocks += [("bottleneck", [wide])] + [(f"decoders.{i}", [wide, wide]) for i in range(4)]
    out = dict(state)
    for name, inputs in blocks:
        for i, segs in ((1, inputs), (2, inputs + [wide]), (3, inputs + [wide, wide])):
            for field in ("weight", "bias", "running_mean", "running_var"):
                key = f"{name}.batchnorm{i}.{field}"
                out[key] = spread(state[key], segs)
            out[f"{name}.conv{i}.weight"] = produce(consume(state[f"{name}.conv{i}.weight"], segs))
            out[f"{name}.conv{i}.bias"] = produce(state[f"{name}.conv{i}.bias"])
        for pre in (f"{name}.se", f"{name}.se.cSE"):  # channel SE (CSE, or within CSSE)
            if f"{pre}.fc1.weight" in state:
                out[f"{pre}.fc1.weight"] = produce(consume(state[f"{pre}.fc1.weight"], [wide]), hidden_copy_of)
                out[f"{pre}.fc1.bias"] = produce(state[f"{pre}.fc1.bias"], hidden_copy_of)
                out[f"{pre}.fc2.weight"] = produce(consume(state[f"{pre}.fc2.weight"], [("wide", hidden_copy_of)]))
                out[f"{pre}.fc2.bias"] = produce(state[f"{pre}.fc2.bias"])
        for pre in (f"{name}.se", f"{name}.se.sSE"):  # spatial SE (SSE, or within CSSE)
            if f"{pre}.conv.weight" in state:
                out[f"{pre}.conv.weight"] = consume(state[f"{pre}.conv.weight"], [wide])
    out["classifier.weight"] = consume(state["classifier.weight"], [wide])
    return out
