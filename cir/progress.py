"""Progress lines for long work: timestamped, flushed, on stderr (Ray Data's own
progress bars stay on beside them)."""
from __future__ import annotations

import sys
import time

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[cir {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)
