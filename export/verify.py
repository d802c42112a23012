"""Export-time verification lives in the runtime (:mod:`qnkit.verification`), where the TensorRT backend
verifies engines it rebuilds with the same slices and bars; this name is kept for export's imports."""
from qnkit.verification import (BARS, agreement, batched, check, context, synthetic_slices,  # noqa: F401
                                verification_grids, verify_engine)
