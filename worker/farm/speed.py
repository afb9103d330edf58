"""How fast this worker's card renders, measured on its own jobs, for the router's load arithmetic.

The router counts load in each worker's own seconds (``shared/routing``): a job's cost-model
seconds divided by the worker's speed. The speed starts at the card's nominal figure (the
``speed`` setting) and follows the ratio of estimated to measured seconds of recent renders, as a
moving average, so a slower or busier card is soon counted as such.
"""

from __future__ import annotations

import threading

# Weight of the newest render: about the last ten jobs count.
SMOOTHING = 0.2
# One odd render (a first CUDA call, a host-tier promotion) moves the figure at most this far.
MAX_STEP = 4.0


class SpeedMeter:
    """A moving average of estimated over measured seconds."""

    def __init__(self, nominal: float) -> None:
        self.speed = nominal
        self.renders = 0
        self._lock = threading.Lock()

    def observe(self, estimated_s: float, measured_s: float) -> None:
        if estimated_s <= 0 or measured_s <= 0:
            return
        ratio = min(max(estimated_s / measured_s, self.speed / MAX_STEP), self.speed * MAX_STEP)
        with self._lock:
            self.speed += SMOOTHING * (ratio - self.speed)
            self.renders += 1
