"""Alarm intervals from a stream of anomaly probabilities: hysteresis plus a minimum duration.

An alarm becomes a candidate at the first window with p >= ``on`` and stays active while
p >= ``off`` (``off <= on``, so a probability wavering around one threshold does not toggle
it). It is confirmed, and reported, once it has been active for ``min_duration`` seconds
(time of the current active window minus time of its first); a candidate that ends sooner is
dropped. The streaming tracker and the batch function give the same intervals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fmfast.errors import SettingsError



OFF_RATIO = 2 / 3  # off = on * 2/3 where not given: the old fixed levels 0.6 / 0.4 keep their ratio


def default_levels(on: float | None, off: float | None, threshold: float | None) -> tuple[float, float, str]:
    """The alarm levels ``(on, off, note)``: given ones win; else ``on`` is the checkpoint's
    threshold calibrated on validation (0.6 without one) and ``off`` two thirds of ``on``."""
    if on is None:
        on, why = (threshold, "the checkpoint's threshold calibrated on validation") if threshold is not None \
            else (0.6, "no calibrated threshold in the checkpoint: the default 0.6")
    else:
        why = "--on"
    if off is None:
        off = on * OFF_RATIO
        why += f"; off = on x {OFF_RATIO:.3g}"
    return on, off, f"alarm levels: on at p >= {on:.3f}, off below {off:.3f} ({why})"

@dataclass
class Alarm:
    start: int  # first active window (index into the probability series)
    last: int  # last active window
    peak: int  # window of the highest probability
    start_time: float
    last_time: float
    peak_prob: float
    open: bool = False  # still active when the series ended

    @property
    def duration(self) -> float:
        return self.last_time - self.start_time


@dataclass
class AlarmTracker:
    on: float = 0.6
    off: float = 0.4
    min_duration: float = 0.0
    _active: Alarm | None = field(default=None, repr=False)
    _confirmed: bool = field(default=False, repr=False)
    _n: int = field(default=0, repr=False)

    def __post_init__(self):
        if not (0.0 <= self.off <= self.on <= 1.0):
            raise SettingsError(f"alarm thresholds need 0 <= off <= on <= 1, got on {self.on}, off {self.off}")
        if self.min_duration < 0:
            raise SettingsError(f"alarm minimum duration must be >= 0 s, got {self.min_duration}")

    @property
    def active(self) -> bool:
        return self._active is not None

    @property
    def current(self) -> Alarm | None:
        """The alarm in progress (confirmed or not), or None."""
        return self._active

    def update(self, p: float, t: float) -> list[tuple[str, Alarm]]:
        """Feed the next window's probability and time. Returns events: ("on", alarm) when an
        alarm is confirmed, ("off", alarm) when a confirmed alarm ends."""
        i, self._n = self._n, self._n + 1
        events = []
        a = self._active
        if a is None:
            if p >= self.on:
                a = self._active = Alarm(i, i, i, t, t, p)
                self._confirmed = False
            else:
                return events
        elif p < self.off:
            if self._confirmed:
                events.append(("off", a))
            self._active = None
            return events
        else:
            a.last, a.last_time = i, t
            if p > a.peak_prob:
                a.peak, a.peak_prob = i, p
        if not self._confirmed and a.duration >= self.min_duration:
            self._confirmed = True
            events.append(("on", a))
        return events

    def finish(self) -> list[tuple[str, Alarm]]:
        """End of the series: a confirmed alarm still active is reported as open."""
        a, self._active = self._active, None
        if a is not None and self._confirmed:
            a.open = True
            return [("off", a)]
        return []


def alarm_intervals(prob, times, on: float = 0.6, off: float = 0.4, min_duration: float = 0.0) -> list[Alarm]:
    """All confirmed alarms of a whole probability series."""
    prob, times = np.asarray(prob, dtype=np.float64), np.asarray(times, dtype=np.float64)
    if prob.shape != times.shape:
        raise ValueError(f"prob {prob.shape} and times {times.shape} differ")
    tr = AlarmTracker(on, off, min_duration)
    out = []
    for p, t in zip(prob.tolist(), times.tolist()):
        out += [a for kind, a in tr.update(p, t) if kind == "off"]
    return out + [a for _, a in tr.finish()]
