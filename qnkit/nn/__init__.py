"""QuickNAT network (needs torch; not imported by ``import qnkit``)."""
from .quicknat import QuickNAT, QuickNATConfig, WithSigmoid
from .unpool import mask_unpool2d, window_max

__all__ = ["QuickNAT", "QuickNATConfig", "WithSigmoid", "mask_unpool2d", "window_max"]
