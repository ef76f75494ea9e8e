"""A simulated fused magnesium furnace: event schedule, video frames with exact masks, arc current.

The scenarios are built so that neither modality alone decides the label:

=============  ======================  ======================  ==========
segment        video shows             current shows           label
=============  ======================  ======================  ==========
anomaly        a growing hot spot      phase imbalance         abnormal
hidden         water mist (spot faint) phase imbalance         abnormal
glare          a hot-spot-like glare   nothing                 normal
disturbance    nothing                 phase imbalance (load)  normal
mist           water mist              nothing                 normal
calm           nothing                 nothing                 normal
=============  ======================  ======================  ==========

So the rule is "imbalance AND (spot OR mist)": a video-only model confuses glare with
anomalies and mist with hidden anomalies, a current-only model confuses load disturbances
with anomalies, and a model reading both can be right. The imbalance is one phase dropping
against the other two, because the current tokenizer layer-normalises the 3 phases of each
step (a common-mode change would be invisible to it). It starts with the segment, a second or
two before a hot spot shows: the arc reacts first, so a labelled frame always has seconds of it
in its current window.

Images are rendered as [n, y, x, 3] and stored in h5py order [n, 3, x, y] ([T, 3, W, H]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCENARIOS = ("anomaly", "hidden", "glare", "disturbance", "mist", "calm")
ABNORMAL = ("anomaly", "hidden")
# one deck per cycle, reshuffled: 40 % of segments hold an anomaly (half of them hidden)
DECK = ("anomaly", "anomaly", "hidden", "hidden", "glare", "glare", "disturbance", "disturbance", "mist", "calm")

HOT_CORE = np.array([255.0, 228.0, 150.0], np.float32)
HOT_EDGE = np.array([245.0, 130.0, 40.0], np.float32)
MIST = np.array([204.0, 207.0, 212.0], np.float32)
GLOW = np.array([255.0, 150.0, 50.0], np.float32)


@dataclass
class Segment:
    kind: str
    start: int        # frames [start, end) of the recording
    end: int
    event: tuple[int, int]  # frames of the event inside the segment
    phase: int | None = None  # the phase that drops, for events the current sees


def schedule(rng: np.random.Generator, frames: int) -> list[Segment]:
    """Cut ``frames`` into segments (about 8 s each at full length) and draw a scenario for each.
    Many short segments rather than a few long ones: more independent events to learn from."""
    base = int(np.clip(frames / 6, 40, 200))
    segs, t, deck = [], 0, []
    while t < frames:
        n = int(base * rng.uniform(0.8, 1.2))
        if frames - (t + n) < base // 2:  # no stub at the end
            n = frames - t
        if not deck:
            deck = list(rng.permutation(DECK))
        kind = str(deck.pop())
        e0 = t + int(n * rng.uniform(0.1, 0.25))
        e1 = min(t + n, e0 + int(n * rng.uniform(0.55, 0.75)))
        segs.append(Segment(kind, t, t + n, (e0, e1)))
        t += n
    return segs


def severity(n: int) -> np.ndarray:
    """Grow-then-fade curve over an event of ``n`` frames, in [0, 1]."""
    u = (np.arange(n) + 0.5) / n
    return np.sin(np.pi * u) ** 0.6


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Periodic smooth noise in [0, 1] of shape [size, size] (coarse grid, bilinear upsample)."""
    g = size // scale
    coarse = rng.random((g, g))
    x = np.arange(size) / scale
    i0 = np.floor(x).astype(int) % g
    i1 = (i0 + 1) % g
    f = x - np.floor(x)
    f = f * f * (3 - 2 * f)
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i1] * f[:, None]
    out = rows[:, i0] * (1 - f)[None] + rows[:, i1] * f[None]
    return ((out - out.min()) / (np.ptp(out) + 1e-9)).astype(np.float32)


class Furnace:
    """One recording's static scene (shell, texture, glow) and its time-varying parts."""

    def __init__(self, rng: np.random.Generator, size: int, frames: int):
        self.size, self.frames = size, frames
        s = size
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        self.y, self.x = y, x
        cx = s * rng.uniform(0.45, 0.55)
        half = s * rng.uniform(0.3, 0.36)
        top = s * rng.uniform(0.22, 0.3)
        self.shell_box = (cx - 0.75 * half, cx + 0.75 * half, top + 0.12 * s, s - 0.08 * s)  # x0, x1, y0, y1

        back = (np.array([38.0, 42.0, 52.0], np.float32) * (0.7 + 0.6 * y[..., None] / s)
                * (0.85 + 0.3 * _smooth_noise(rng, s, max(s // 8, 1))[..., None]))
        u = np.clip((x - cx) / half, -1, 1)
        shell = (np.abs(x - cx) < half) & (y > top)
        shade = 0.45 + 0.55 * np.sqrt(1 - u ** 2)
        tex = 0.78 + 0.3 * _smooth_noise(rng, s, max(s // 16, 1)) + 0.12 * _smooth_noise(rng, s, max(s // 4, 1))
        bands = 1 - 0.12 * (np.mod(y - top, s / 5) < 1.2)  # hoops around the shell
        steel = np.array([118.0, 100.0, 86.0], np.float32) * rng.uniform(0.9, 1.1)
        shell_img = steel * (shade * tex * bands)[..., None]
        self.base = np.where(shell[..., None], shell_img, back).astype(np.float32)
        # the arc glow at the furnace mouth, and the light it throws on the shell
        d2 = ((x - cx) / (0.8 * half)) ** 2 + ((y - top) / (0.07 * s)) ** 2
        self.glow = (np.exp(-d2) + 0.25 * np.exp(-((y - top) / (0.35 * s)) ** 2) * shell).astype(np.float32)
        # per-frame light: slow swing + fast arc flicker
        t = np.arange(frames, dtype=np.float32)
        ar = np.zeros(frames, np.float32)
        e = rng.normal(0, 0.03, frames).astype(np.float32)
        for i in range(1, frames):
            ar[i] = 0.8 * ar[i - 1] + e[i]
        self.light = 1 + 0.05 * np.sin(2 * np.pi * t / 25 / rng.uniform(2, 5) + rng.uniform(0, 6.3)) + ar
        self.flare = np.clip(0.75 + 0.25 * rng.standard_normal(frames), 0.3, 1.4).astype(np.float32)
        self.noise_bank = rng.normal(0, 3.0, (16, s, s, 3)).astype(np.float32)
        self.noise_pick = rng.integers(0, 16, frames)
        self.mist_field = _smooth_noise(rng, 2 * s, max(s // 4, 1))

    # ---- events -------------------------------------------------------------------------
    def spot_shape(self, rng: np.random.Generator):
        """Centre, size and irregular outline of a hot spot (or of a glare that mimics one)."""
        x0, x1, y0, y1 = self.shell_box
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        rmax = max(2.0, self.size * rng.uniform(0.12, 0.22))
        th = np.arctan2(self.y - cy, self.x - cx)
        wobble = 1 + 0.18 * np.cos(2 * th + rng.uniform(0, 6.3)) + 0.1 * np.cos(3 * th + rng.uniform(0, 6.3))
        d = np.hypot(self.x - cx, self.y - cy) / wobble  # distance in "radius units"
        return d.astype(np.float32), rmax

    @staticmethod
    def spot_alpha(d: np.ndarray, r: np.ndarray):
        """Opacity [n,s,s] of a spot of radius r [n] and its exact mask (pixels inside the outline)."""
        on = (r >= 1.0)[:, None, None]  # a spot exists (and is labelled) from 1 px radius on
        rr = r[:, None, None]
        inside = (d[None] <= rr) & on
        alpha = np.clip(rr - d[None] + 0.5, 0, 1) * on
        halo = np.float32(0.3) * np.exp(-np.maximum(d[None] - rr, 0) / np.float32(1.5)) * on
        return alpha, halo, inside

    def mist_opacity(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Drifting water-mist opacity [n, s, s], fading in and out over the event."""
        s = self.size
        peak = rng.uniform(0.96, 0.99)
        v = rng.uniform(-0.6, 0.6, 2)
        t = np.arange(n)
        sy = np.floor(t * v[0] + rng.uniform(0, s)).astype(int)
        sx = np.floor(t * v[1] + rng.uniform(0, s)).astype(int)
        yy = (np.arange(s)[None, :, None] + sy[:, None, None]) % (2 * s)
        xx = (np.arange(s)[None, None, :] + sx[:, None, None]) % (2 * s)
        field = self.mist_field[yy, xx]
        ramp = np.clip(np.minimum(t + 1, n - t) / max(n * 0.1, 1), 0, 1)[:, None, None]
        return (ramp * peak * (0.96 + 0.08 * (field - 0.5))).astype(np.float32)

    # ---- rendering ----------------------------------------------------------------------
    def render(self, t0: int, t1: int, spots: list, mists: list):
        """Frames [t0, t1) as uint8 [n, 3, W, H] and masks uint8 [n, W, H] (h5py order).

        ``spots``: (start, end, d, rmax, is_anomaly); ``mists``: (start, end, opacity [end-start,s,s]).
        """
        n = t1 - t0
        light = self.light[t0:t1, None, None, None]
        img = self.base[None] * light + self.glow[None, ..., None] * GLOW * (0.5 * self.flare[t0:t1, None, None, None])
        mask = np.zeros((n, self.size, self.size), bool)
        for a, b, d, rmax, anomalous in spots:
            lo, hi = max(a, t0), min(b, t1)
            if lo >= hi:
                continue
            r = (rmax * severity(b - a)[lo - a:hi - a]).astype(np.float32)
            alpha, halo, inside = self.spot_alpha(d, r)
            core = np.clip(1 - d[None] / np.maximum(r[:, None, None], 1e-3), 0, 1)[..., None]
            hot = (HOT_EDGE + (HOT_CORE - HOT_EDGE) * core) * (0.93 + 0.07 * light[lo - t0:hi - t0])
            seg = img[lo - t0:hi - t0]
            seg += (hot - seg) * alpha[..., None] + halo[..., None] * HOT_EDGE * (1 - alpha[..., None])
            if anomalous:
                mask[lo - t0:hi - t0] |= inside
        for a, b, op in mists:
            lo, hi = max(a, t0), min(b, t1)
            if lo >= hi:
                continue
            m = op[lo - a:hi - a, ..., None]
            seg = img[lo - t0:hi - t0]
            seg += (MIST * (0.97 + 0.03 * light[lo - t0:hi - t0]) - seg) * m
        img += self.noise_bank[self.noise_pick[t0:t1]]
        frames = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return frames.transpose(0, 3, 2, 1), mask.transpose(0, 2, 1).astype(np.uint8)


def current_log(rng: np.random.Generator, slots: int, imbalance: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Three-phase arc current [slots, 3] in amperes, two slots per second.

    ``imbalance`` [slots] in [0, 1] is the strength of a phase imbalance (anomaly or load
    disturbance) and ``phase`` [slots] the phase that drops. Normal operation: phases near
    10 kA with one phase running a few percent high (a furnace's usual electrode pattern), a
    slow common drift, white load noise and rare one-slot arc spikes.

    Each current token is layer-normalised over its 3 phases, which keeps only the direction
    of the 3-vector, not its size. The usual pattern keeps normal rows in one direction; an
    event pulls the direction well away from it (towards "phase p low"), so a single row
    already carries evidence and a run of rows makes it certain.
    """
    high = rng.integers(0, 3)
    level = 10000.0 * (1 + rng.normal(0, 0.003, 3) + rng.uniform(0.05, 0.07) * np.eye(3)[high])
    walk = np.cumsum(rng.normal(0, 0.004, (slots, 4)), axis=0)
    k = 41
    walk = np.stack([np.convolve(np.pad(w, k // 2, mode="edge"), np.ones(k) / k, "valid") for w in walk.T], 1)
    drift = 0.04 * np.tanh(walk[:, :1] * 3) + 0.003 * np.tanh(walk[:, 1:] * 3)
    noise = rng.normal(0, 0.01, (slots, 3))
    spikes = (rng.random((slots, 3)) < 0.005) * rng.choice([-1.0, 1.0], (slots, 3)) * rng.uniform(0.03, 0.05, (slots, 3))
    amp = np.minimum(1.0, 2.5 * imbalance)[:, None]  # the arc reacts early in an event
    onehot = np.eye(3)[phase]
    event = amp * (-0.2 * onehot + 0.05 * (1 - onehot)) + rng.normal(0, 1, (slots, 3)) * 0.02 * amp
    return (level * (1 + drift + noise + spikes + event)).astype(np.float64)
