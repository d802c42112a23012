"""QuickNAT hyper-parameters, without torch: the training settings' [NETWORK] section is this
dataclass's fields, and ``qnkit.nn.quicknat`` builds the network from it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["SE_BLOCKS", "QuickNATConfig"]

SE_BLOCKS = ("NONE", "CSE", "SSE", "CSSE")
_INT_FIELDS = ("num_channels", "num_filters", "kernel_h", "kernel_w", "kernel_c", "stride_conv",
               "pool", "stride_pool", "num_class")


@dataclass(frozen=True)
class QuickNATConfig:
    """QuickNAT hyper-parameters (names as in the reference ``params`` dict)."""

    num_channels: int = 1
    num_filters: int = 64
    kernel_h: int = 5
    kernel_w: int = 5
    kernel_c: int = 1
    stride_conv: int = 1
    pool: int = 2
    stride_pool: int = 2
    num_class: int = 1
    se_block: str = "CSSE"
    drop_out: float = 0.2

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"QuickNATConfig.{name} must be a positive integer, got {v!r}")
        for name in ("kernel_h", "kernel_w", "kernel_c"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"QuickNATConfig.{name} must be odd, got {getattr(self, name)}")
        if self.stride_conv != 1:
            raise ValueError("QuickNATConfig.stride_conv must be 1 (dense concatenation needs "
                             "equal sizes)")
        if self.pool != self.stride_pool or self.pool < 2:
            raise ValueError(
                f"QuickNATConfig needs non-overlapping pooling (pool == stride_pool >= 2), "
                f"got pool={self.pool}, stride_pool={self.stride_pool}")
        se = str(self.se_block).upper()
        if se not in SE_BLOCKS:
            raise ValueError(
                f"QuickNATConfig.se_block must be one of {SE_BLOCKS}, got {self.se_block!r}")
        object.__setattr__(self, "se_block", se)
        if se in ("CSE", "CSSE") and self.num_filters < 2:
            raise ValueError(f"se_block={se} needs num_filters >= 2")
        if isinstance(self.drop_out, bool) or not isinstance(self.drop_out, (int, float)) \
                or not 0.0 <= self.drop_out < 1.0:
            raise ValueError(
                f"QuickNATConfig.drop_out must be a number in [0, 1), got {self.drop_out!r}")
        object.__setattr__(self, "drop_out", float(self.drop_out))

    @property
    def size_divisor(self) -> int:
        """H and W of the input must be multiples of this (four pooling levels)."""
        return self.stride_pool ** 4

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuickNATConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing keys take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuickNATConfig keys: {', '.join(map(str, unknown))}")
        return cls(**d)
