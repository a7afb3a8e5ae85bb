"""Backend health: in-flight count, time-to-first-byte EWMA, passive ejection, probe results,
an operator's drain; and a route's recent times to first byte (the `p95` of `fanout: hedge`).

State is per process and survives config reloads for backends whose name is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.config.model import EjectionConfig

EWMA_ALPHA = 0.3


@dataclass(slots=True)
class BackendState:
    inflight: int = 0
    ewma_ttfb_s: float | None = None
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    resting_until: float = 0.0  # an upstream 429 asked us to wait: honoured even in panic
    probe_down: bool = False
    # Taken out of rotation by an operator (router/drains.py keeps it in step with the store):
    # no new requests, even in panic; those under way finish.
    drained: bool = False
    # Where cool-downs and rests are measured from: the monotonic clock callers pass as `now`.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def available(self, now: float) -> bool:
        return (not self.probe_down and not self.drained and now >= self.ejected_until
                and now >= self.resting_until)

    def resting(self, now: float) -> bool:
        return now < self.resting_until

    def held_out(self, now: float) -> bool:
        """Out of rotation even when every backend of a route is down (panic): drained by an
        operator, or resting because its upstream said when to come back."""
        return self.drained or now < self.resting_until

    def record_ttfb(self, seconds: float) -> None:
        prev = self.ewma_ttfb_s
        self.ewma_ttfb_s = seconds if prev is None else prev + EWMA_ALPHA * (seconds - prev)

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.ejected_until and self.clock() >= self.ejected_until:
            self.ejections = 0
            self.ejected_until = 0.0

    def record_failure(self, policy: EjectionConfig) -> bool:
        """Count a failure; returns True when this one ejects the backend."""
        self.consecutive_failures += 1
        if self.consecutive_failures < policy.consecutive_failures:
            return False
        self.consecutive_failures = 0
        self.ejections += 1
        cooldown = min(policy.base_cooldown_s * self.ejections, policy.max_cooldown_s)
        self.ejected_until = self.clock() + cooldown
        return True

    def rest(self, seconds: float) -> None:
        """An upstream asked us to back off (429 Retry-After)."""
        self.resting_until = max(self.resting_until, self.clock() + seconds)


class TtfbWindow:
    """A route's last SIZE times to first byte, for `hedge_after_ms: p95`: recording is one list
    store; the percentile is recomputed (a sort of SIZE floats) after every RECOMPUTE new samples.
    None until MIN_SAMPLES have been seen."""

    SIZE = 256
    MIN_SAMPLES = 20
    RECOMPUTE = 16

    __slots__ = ("_count", "_fresh", "_p95", "_samples")

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._count = 0  # samples ever recorded
        self._fresh = 0  # recorded since _p95 was computed
        self._p95: float | None = None

    def record(self, seconds: float) -> None:
        if len(self._samples) < self.SIZE:
            self._samples.append(seconds)
        else:
            self._samples[self._count % self.SIZE] = seconds
        self._count += 1
        self._fresh += 1

    def p95(self) -> float | None:
        if self._count < self.MIN_SAMPLES:
            return None
        if self._p95 is None or self._fresh >= self.RECOMPUTE:
            ordered = sorted(self._samples)
            self._p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            self._fresh = 0
        return self._p95
