"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, peak: float = 1.0, floor: float = 0.0) -> float:
    """The value at optimizer step `step` (0-based): `peak * (step + 1) / warmup` during
    the first `warmup` steps, then a cosine from `peak` down to `floor` at `total`, and
    `floor` after it. With the defaults it is the factor a `LambdaLR` multiplies the
    base learning rate by."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
