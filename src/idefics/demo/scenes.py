"""Synthetic scenes: 1 to 3 colored shapes on a plain background, and the Pillow renderer the demo model is
trained on. Geometry is in fractions of the canvas, so one scene renders at any size."""
from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")

# (hue range in degrees, saturation range, value range) per color; hues may wrap past 360. Wide enough to hold
# the usual definitions of each name (CSS, Tk, matplotlib), disjoint so that a color has one name.
COLOR_HSV = {
    "red": ((-12, 10), (0.7, 1.0), (0.55, 1.0)),
    "orange": ((20, 40), (0.75, 1.0), (0.85, 1.0)),
    "yellow": ((49, 62), (0.75, 1.0), (0.85, 1.0)),
    "green": ((85, 150), (0.6, 1.0), (0.45, 1.0)),
    "blue": ((200, 245), (0.65, 1.0), (0.5, 1.0)),
    "purple": ((265, 305), (0.55, 1.0), (0.45, 0.95)),
    "black": ((0, 360), (0.0, 0.3), (0.0, 0.14)),
    "white": ((0, 360), (0.0, 0.06), (0.93, 1.0)),
}
SMALL, LARGE = (0.07, 0.11), (0.16, 0.24)  # radius ranges, fractions of the canvas' shorter side
MIN_CONTRAST = 75  # RGB distance between a shape and its background


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    x: float  # center, fraction of the width
    y: float  # center, fraction of the height
    radius: float  # fraction of the shorter side
    large: bool


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    dark: bool  # a dark background (for the stories)


def hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def sample_rgb(color: str, rng: random.Random) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = COLOR_HSV[color]
    return hsv_rgb(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def sample_background(rng: random.Random) -> tuple[tuple[int, int, int], bool]:
    if rng.random() < 0.5:
        return hsv_rgb(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.72, 0.97)), False
    return hsv_rgb(rng.uniform(0, 360), rng.uniform(0, 0.35), rng.uniform(0.12, 0.4)), True


def contrast(a, b) -> float:
    return math.dist(a, b)


def sample_scene(rng: random.Random, count: int | None = None, kind: str | None = None, color: str | None = None,
                 pick_rgb=sample_rgb, pick_background=sample_background) -> Scene:
    """A random scene. `kind` / `color` force every shape to that shape / color; `pick_rgb(color, rng)` gives the
    shade of each named color, `pick_background(rng)` the background and whether it is dark."""
    count = count or rng.randint(1, 3)
    picks = []
    for _ in range(count):
        # Repeats are made likelier than chance so that counting questions see twos and threes.
        k = kind or (rng.choice([p[0] for p in picks]) if picks and rng.random() < 0.3 else rng.choice(SHAPES))
        c = color or (rng.choice([p[1] for p in picks]) if picks and rng.random() < 0.3 else rng.choice(COLORS))
        picks.append((k, c))
    rgbs = [pick_rgb(c, rng) for _, c in picks]
    for _ in range(100):
        background, dark = pick_background(rng)
        if all(contrast(background, rgb) >= MIN_CONTRAST for rgb in rgbs):
            break
    else:
        background, dark = ((235, 235, 235), False) if all(sum(v) < 400 for v in rgbs) else ((40, 40, 40), True)
    for attempt in range(200):
        shrink = 1.0 - attempt / 250  # crowded draws get smaller large shapes until they fit
        shapes = []
        for (k, c), rgb in zip(picks, rgbs):
            large = rng.random() < 0.5
            lo, hi = LARGE if large else SMALL
            r = rng.uniform(lo, hi * shrink if large and count > 1 else hi)
            extent = r * 1.15 + 0.02  # a bound on every shape's reach, plus a margin
            x, y = rng.uniform(extent, 1 - extent), rng.uniform(extent, 1 - extent)
            shapes.append(Shape(k, c, rgb, x, y, r, large))
        if all(math.dist((a.x, a.y), (b.x, b.y)) > 1.15 * (a.radius + b.radius) + 0.03
               for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            return Scene(tuple(shapes), background, dark)
    raise RuntimeError("could not place the shapes")  # not reached with the ranges above


def outline(kind: str, rng: random.Random | None = None, angle: float = 0.0) -> list[tuple[float, float]]:
    """Polygon vertices around (0, 0) for a shape of radius 1 (y down); circles have none."""
    jitter = (lambda a, b: rng.uniform(a, b)) if rng else (lambda a, b: (a + b) / 2)
    if kind == "square":
        h = 0.85
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif kind == "triangle":
        w, apex = 1.05 * jitter(0.85, 1.15), jitter(-0.35, 0.35)
        top, base = -1.1 * jitter(0.9, 1.1), 0.75
        points = [(apex, top), (w, base), (-w, base)]
    elif kind == "star":
        inner = jitter(0.38, 0.5)
        points = [((1.1 if i % 2 == 0 else 1.1 * inner) * math.sin(i * math.pi / 5),
                   -(1.1 if i % 2 == 0 else 1.1 * inner) * math.cos(i * math.pi / 5)) for i in range(10)]
    else:
        return []
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def render(scene: Scene, rng: random.Random | None = None, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """Draw with Pillow. With `rng`, a random augmentation: canvas size and aspect, supersampling, rotation,
    outlines, blur, noise and JPEG; without, a clean filled drawing of `size`."""
    if rng is not None:
        side = rng.choice([rng.randint(48, 128), rng.randint(96, 256)])
        aspect = math.exp(rng.uniform(-0.45, 0.45)) if rng.random() < 0.4 else 1.0  # up to 3:2 either way
        size = (max(32, round(side * aspect)), side)
    ss = rng.choice([1, 1, 2, 3]) if rng else 2  # supersampling factor: 1 draws aliased edges
    w, h = size[0] * ss, size[1] * ss
    image = Image.new("RGB", (w, h), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy, r = shape.x * w, shape.y * h, shape.radius * min(w, h)
        angle = rng.uniform(-15, 15) if rng else 0.0
        filled = rng.random() > 0.2 if rng else True
        stroke = max(ss, round(r * rng.uniform(0.15, 0.3))) if rng else 0
        points = outline(shape.kind, rng, angle)
        if points:
            xy = [(cx + px * r, cy + py * r) for px, py in points]
            if filled:
                draw.polygon(xy, fill=shape.rgb)
            else:
                draw.polygon(xy, outline=shape.rgb, width=stroke)
        elif filled:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shape.rgb)
        else:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=shape.rgb, width=stroke)
    if ss > 1:
        image = image.reduce(ss)  # box filter: anti-aliased edges
    if rng is not None:
        image = degrade(image, rng)
    return image


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, noise and JPEG compression, each sometimes."""
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * min(image.size) / 96))
    if rng.random() < 0.1:
        noise = Image.effect_noise(image.size, rng.uniform(4, 16)).convert("RGB")
        image = Image.blend(image, noise, 0.08)
    if rng.random() < 0.35:
        image = jpeg(image, rng.randint(25, 90))
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# The second renderer: other shades (CSS named colors), other backgrounds, other geometry and anti-aliasing
# computed from per-pixel coverage with numpy. Used to check that the model learned shapes and colors rather
# than the training renderer's habits.
CSS_RGB = {
    "red": [(255, 0, 0), (220, 20, 60), (178, 34, 34)],
    "green": [(0, 128, 0), (34, 139, 34), (50, 205, 50)],
    "blue": [(0, 0, 255), (30, 144, 255), (65, 105, 225)],
    "yellow": [(255, 255, 0), (255, 215, 0)],
    "orange": [(255, 165, 0), (255, 140, 0)],
    "purple": [(128, 0, 128), (148, 0, 211), (128, 0, 255)],
    "black": [(0, 0, 0), (25, 25, 25)],
    "white": [(255, 255, 255), (245, 245, 245)],
}
CSS_BACKGROUNDS = [((245, 245, 245), False), ((211, 211, 211), False), ((245, 245, 220), False),
                   ((230, 230, 250), False), ((240, 255, 240), False), ((255, 228, 225), False),
                   ((105, 105, 105), True), ((47, 79, 79), True), ((30, 30, 30), True), ((60, 60, 70), True)]


def css_rgb(color: str, rng: random.Random) -> tuple[int, int, int]:
    return rng.choice(CSS_RGB[color])


def css_background(rng: random.Random) -> tuple[tuple[int, int, int], bool]:
    return rng.choice(CSS_BACKGROUNDS)


def sample_css_scene(rng: random.Random, **options) -> Scene:
    return sample_scene(rng, pick_rgb=css_rgb, pick_background=css_background, **options)


def _inside(kind: str, x, y):
    """Boolean mask of points (x, y) in units of the radius, centered on the shape: a circle, an axis-aligned
    square, an equilateral triangle around its centroid, a five-pointed star by the even-odd rule."""
    import numpy as np

    if kind == "circle":
        return x * x + y * y <= 1.0
    if kind == "square":
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if kind == "triangle":
        corners = [(1.2 * math.cos(math.radians(a)), 1.2 * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    else:
        corners = [((1.15 if i % 2 == 0 else 0.5) * math.cos(math.radians(-90 + 36 * i)),
                    (1.15 if i % 2 == 0 else 0.5) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def render_alt(scene: Scene, size: tuple[int, int] = (200, 200), ring: bool = False,
               quality: int | None = None) -> Image.Image:
    """Draw with numpy: each pixel's color mixes shape and background by the share of its 4x4 sub-samples inside
    the shape. `ring` draws outlines (the shape minus a shrunk copy); `quality` saves through JPEG."""
    import numpy as np

    w, h = size
    pixels = np.empty((h, w, 3), dtype=np.float64)
    pixels[:] = scene.background
    sub = (np.arange(4) + 0.5) / 4
    for shape in scene.shapes:
        r = shape.radius * min(w, h)
        cx, cy = shape.x * w, shape.y * h
        # Only the pixels of the shape's bounding box are sampled.
        x0, x1 = max(0, int(cx - 1.3 * r)), min(w, int(cx + 1.3 * r) + 2)
        y0, y1 = max(0, int(cy - 1.3 * r)), min(h, int(cy + 1.3 * r) + 2)
        ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)  # (4 rows per pixel,)
        xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)
        gy, gx = np.meshgrid((ys - cy) / r, (xs - cx) / r, indexing="ij")
        mask = _inside(shape.kind, gx, gy)
        if ring:
            mask &= ~_inside(shape.kind, gx / 0.72, gy / 0.72)
        cover = mask.reshape(y1 - y0, 4, x1 - x0, 4).mean(axis=(1, 3))[..., None]
        box = pixels[y0:y1, x0:x1]
        pixels[y0:y1, x0:x1] = box * (1 - cover) + np.asarray(shape.rgb, dtype=np.float64) * cover
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    return jpeg(image, quality) if quality else image
