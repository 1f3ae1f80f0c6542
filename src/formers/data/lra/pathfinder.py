"""Pathfinder (Linsley et al., 2018) as Long Range Arena uses it: an image holds two long dashed
contours ("snakes" of short line segments, the paddles), short distractor snakes, and two circle
markers; label 1 = both markers sit on the ends of one contour, 0 = they sit on different contours.
Flattened row-major, the 256 grey levels are the tokens (32x32 = 1,024; Path-X 128x128 = 16,384).

A re-implementation, not the snakes2 code (drewlinsley/pathfinder; its images are not reproduced
bit for bit, so the task is labelled a substitute). Kept from snakes2 and LRA's settings: the two
target snakes grow paddle by paddle from two seeds `seed_distance` apart; positive = origin and end
marker on one snake, negative = the origin of one and the end of the other; contour length 14 (hard),
distractor snakes of contour_length // 3 paddles, their number = 20 (32 px) or 35 (128 px) // that;
paddle length/thickness/margin, marker radius, padding and 2x anti-aliasing as LRA's settings.
Our choices: each paddle turns by at most `continuity` x 45 degrees from the last; different snakes
keep `clearance` pixels apart (Chebyshev) so that "joined" is decidable from the pixels; strokes are
drawn at 2x and box-averaged; pixel = 255 * min(1, 2 * coverage); a growing snake that meets a dead
end undoes its last two paddles and tries again. Seeded numpy Generator throughout.
"""
from __future__ import annotations

import math

import numpy as np

VERSION = 1
AA = 2                           # anti-aliasing scale (LRA: antialias_scale=2)
MAX_TRIALS = 8                   # placements tried per paddle

# LRA's settings per image size (lra.md §1.2); paddle_length at 128 px is ours (not in the sheet)
SIZES = {
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, margins=(1,), marker_radius=1.5,
             seed_distance=7, continuity=1.0, distractor_budget=20),
    128: dict(padding=1, paddle_length=5, paddle_thickness=1.5, margins=(2, 3), marker_radius=3.0,
              seed_distance=20, continuity=1.8, distractor_budget=35),
}
CONTOUR_LENGTH = {"easy": 6, "intermediate": 9, "hard": 14}


def defaults(task: str) -> dict:
    size = 32 if task == "pathfinder32" else 128
    n = (1000, 100, 200) if size == 32 else (200, 50, 100)
    return dict(train=n[0], val=n[1], test=n[2], difficulty="hard", seed=0, size=size)


def config(size: int, difficulty: str = "hard") -> dict:
    if size not in SIZES:
        raise ValueError(f"pathfinder: size must be one of {sorted(SIZES)}, got {size}")
    if difficulty not in CONTOUR_LENGTH:
        raise ValueError(f"pathfinder: difficulty must be one of {', '.join(CONTOUR_LENGTH)}, got {difficulty!r}")
    cfg = dict(SIZES[size], size=size, contour_length=CONTOUR_LENGTH[difficulty])
    cfg["distractor_length"] = cfg["contour_length"] // 3
    cfg["num_distractors"] = cfg["distractor_budget"] // cfg["distractor_length"]
    # consecutive paddles of one snake touch pixels at most `margin` apart (Chebyshev: the gap is margin
    # px and a stroke touches the pixel of its end point), so different snakes keep margin + 1 apart:
    # "joined" is then decidable from the pixels alone (at 32 px: plain 8-connectivity)
    cfg["clearance"] = max(cfg["margins"]) + 1
    return cfg


def _stroke(shape_hi, p0, p1, radius):
    """Hi-res boolean mask of the points within `radius` (hi-res px) of segment p0-p1 (1x coords)."""
    a, b = np.asarray(p0, float) * AA, np.asarray(p1, float) * AA
    lo = np.floor(np.minimum(a, b) - radius - 1).astype(int).clip(0)
    hi = np.ceil(np.maximum(a, b) + radius + 2).astype(int)
    hi = np.minimum(hi, shape_hi)
    ys, xs = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]] + 0.5
    d = b - a
    t = np.clip(((ys - a[0]) * d[0] + (xs - a[1]) * d[1]) / max(d @ d, 1e-12), 0.0, 1.0)
    dist2 = (ys - a[0] - t * d[0]) ** 2 + (xs - a[1] - t * d[1]) ** 2
    return (lo[0], lo[1]), dist2 <= radius ** 2


class _Canvas:
    """Drawn strokes as records (snake id, hi-res patch, 1x pixels it touches); `owner` holds the
    snake id of every touched 1x pixel, so a stroke can be undone (the growth backtracks)."""

    def __init__(self, size: int, clearance: int):
        self.size, self.clearance = size, clearance
        self.hi_shape = (size * AA, size * AA)
        self.records: list = []
        self.owner = np.full((size, size), -1, np.int16)

    @staticmethod
    def pixels(off, m) -> np.ndarray:
        ys, xs = np.nonzero(m)
        return np.unique(np.stack([(ys + off[0]) // AA, (xs + off[1]) // AA], 1), axis=0)

    def fits(self, pix: np.ndarray, snake: int) -> bool:
        """No pixel of another snake within clearance - 1 (Chebyshev) of the candidate pixels."""
        c = self.clearance - 1
        y0, x0 = np.maximum(pix.min(0) - c, 0)
        y1, x1 = pix.max(0) + c + 1
        win = self.owner[y0:y1, x0:x1]
        oy, ox = np.nonzero((win >= 0) & (win != snake))
        if not len(oy):
            return True
        dy = np.abs(pix[:, None, 0] - (oy + y0)[None])
        dx = np.abs(pix[:, None, 1] - (ox + x0)[None])
        return bool((np.maximum(dy, dx) > c).all())

    def draw(self, off, m, pix, snake: int):
        self.records.append((snake, off, m, pix))
        self.owner[pix[:, 0], pix[:, 1]] = snake

    def undo(self, snake: int):
        """Remove the last stroke of `snake`."""
        i = max(j for j, r in enumerate(self.records) if r[0] == snake)
        self.records.pop(i)
        self.owner[:] = -1
        for sid, _, _, pix in self.records:
            self.owner[pix[:, 0], pix[:, 1]] = sid

    def image(self) -> np.ndarray:
        hi = np.zeros(self.hi_shape, np.float32)
        for _, off, m, _ in self.records:
            hi[off[0]:off[0] + m.shape[0], off[1]:off[1] + m.shape[1]][m] = 1.0
        cov = hi.reshape(self.size, AA, self.size, AA).mean((1, 3))
        return np.round(255 * np.minimum(1.0, 2.0 * cov)).astype(np.uint8)


def _inside(p, cfg) -> bool:
    lo, hi = cfg["padding"] + 0.5, cfg["size"] - cfg["padding"] - 0.5
    return lo <= p[0] <= hi and lo <= p[1] <= hi


class _Snake:
    def __init__(self, sid: int, start, angle: float):
        self.sid, self.tip, self.angle, self.end = sid, np.asarray(start, float), angle, None
        self.history: list = []            # (angle, end) before each paddle, to backtrack

    @property
    def paddles(self) -> int:
        return len(self.history)


def _add_paddle(rng, canvas: _Canvas, s: _Snake, cfg, margin: int) -> bool:
    """Extend snake s by one paddle (after a gap of `margin` px), turning at most continuity x 45 deg."""
    r_hi = max(cfg["paddle_thickness"] * AA / 2, 0.75)
    max_turn = math.radians(45.0 * cfg["continuity"])
    first = s.paddles == 0
    for _ in range(MAX_TRIALS):
        ang = rng.uniform(-math.pi, math.pi) if first else s.angle + rng.uniform(-max_turn, max_turn)
        d = np.array([math.sin(ang), math.cos(ang)])
        p0 = s.tip if first else s.end + margin * d
        p1 = p0 + cfg["paddle_length"] * d
        if not (_inside(p0, cfg) and _inside(p1, cfg)):
            continue
        off, m = _stroke(canvas.hi_shape, p0, p1, r_hi)
        pix = canvas.pixels(off, m)
        if canvas.fits(pix, s.sid):
            canvas.draw(off, m, pix, s.sid)
            s.history.append((s.angle, s.end))
            s.angle, s.end = ang, p1
            return True
    return False


def _grow(rng, canvas: _Canvas, s: _Snake, cfg, margin: int, n: int, budget: list) -> bool:
    """Grow s to n paddles; a dead end undoes the last two paddles (while budget[0] lasts)."""
    while s.paddles < n:
        if _add_paddle(rng, canvas, s, cfg, margin):
            continue
        if budget[0] <= 0 or s.paddles == 0:
            return False
        budget[0] -= 1
        for _ in range(min(2, s.paddles)):
            canvas.undo(s.sid)
            s.angle, s.end = s.history.pop()
    return True


def _marker(canvas: _Canvas, centre, cfg, sid: int) -> bool:
    off, m = _stroke(canvas.hi_shape, centre, centre, cfg["marker_radius"] * AA)
    pix = canvas.pixels(off, m)
    if not canvas.fits(pix, sid):
        return False
    canvas.draw(off, m, pix, sid)
    return True


def _try_example(rng, cfg, label: int):
    size, margin = cfg["size"], int(rng.choice(cfg["margins"]))
    canvas = _Canvas(size, cfg["clearance"])
    border = min(2 * cfg["seed_distance"], size // 2 - 1)     # snakes2 keeps the first seed this far inside
    seed1 = rng.uniform(border, size - border, 2)
    a = rng.uniform(0, 2 * math.pi)
    seed2 = seed1 + cfg["seed_distance"] * np.array([math.sin(a), math.cos(a)])
    if not _inside(seed2, cfg):
        return None
    snakes = [_Snake(0, seed1, 0.0), _Snake(1, seed2, 0.0)]
    budget = [40]
    for i in range(1, cfg["contour_length"] + 1):            # grow the two targets in turn, as snakes2 does
        for s in snakes:
            if not _grow(rng, canvas, s, cfg, margin, i, budget):
                return None
    # markers: origin of one snake, and the end of the same one (label 1) or of the other (label 0)
    k = int(rng.integers(2))
    ends = (snakes[k].tip, snakes[k if label else 1 - k].end)
    owners = (k, k if label else 1 - k)
    for c, sid in zip(ends, owners):
        if not _marker(canvas, c, cfg, sid):
            return None
    lo, hi = cfg["padding"] + 1, size - cfg["padding"] - 1
    placed = 0
    for j in range(cfg["num_distractors"]):                # short snakes; one that finds no room is dropped
        for _ in range(3):
            d = _Snake(2 + j, rng.uniform(lo, hi, 2), 0.0)
            if _grow(rng, canvas, d, cfg, margin, cfg["distractor_length"], [4]):
                placed += 1
                break
            while d.paddles:                                   # remove a distractor that did not fit
                canvas.undo(d.sid)
                d.history.pop()
    return canvas.image(), np.array(ends), placed


def generate_example(rng: np.random.Generator, cfg: dict, label: int):
    """(image uint8 (size, size), marker centres (2, 2) as (row, col) floats, distractors placed)."""
    while True:
        out = _try_example(rng, cfg, label)
        if out is not None:
            return out


def build(task: str, train: int, val: int, test: int, difficulty: str, seed: int, size: int) -> dict:
    cfg = config(size, difficulty)
    rng = np.random.default_rng(seed)
    out = {"info": dict(vocab_size=256, num_classes=2, substitute=True, padded=False,
                        source=f"substitute: Pathfinder-{size} re-implementation (snakes2 settings, "
                               f"{difficulty} = contour length {cfg['contour_length']})")}
    for split, n in (("train", train), ("val", val), ("test", test)):
        labels = rng.permutation(np.arange(n) % 2)
        imgs = np.stack([generate_example(rng, cfg, int(y))[0].reshape(-1) for y in labels]) if n else \
            np.zeros((0, size * size), np.uint8)
        out[f"x_{split}"], out[f"y_{split}"] = imgs, labels.astype(np.int8)
    return out
