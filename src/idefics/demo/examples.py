"""The bundled example images: a few fixed scenes, drawn once with both renderers and stored in images/.
`python -m idefics.demo.examples` redraws them."""
from __future__ import annotations

from pathlib import Path

from idefics.demo.scenes import Scene, Shape, render, render_alt

IMAGES = Path(__file__).parent / "images"

SCENES = {
    "circle_and_square.png": Scene((Shape("circle", "red", (220, 30, 40), 0.3, 0.38, 0.2, True),
                                    Shape("square", "blue", (30, 70, 220), 0.74, 0.7, 0.1, False)),
                                   (236, 232, 222), False),
    "stars.png": Scene((Shape("star", "yellow", (250, 210, 20), 0.25, 0.3, 0.16, True),
                        Shape("star", "red", (230, 40, 40), 0.72, 0.28, 0.1, False),
                        Shape("triangle", "green", (40, 170, 60), 0.5, 0.72, 0.18, True)),
                       (40, 42, 58), True),
    "triangle.png": Scene((Shape("triangle", "purple", (130, 40, 170), 0.55, 0.5, 0.24, True),),
                          (214, 226, 214), False),
    "three_shapes.png": Scene((Shape("circle", "orange", (250, 140, 0), 0.75, 0.25, 0.1, False),
                               Shape("square", "white", (250, 250, 250), 0.28, 0.3, 0.16, True),
                               Shape("star", "black", (10, 10, 10), 0.6, 0.72, 0.18, True)),
                              (60, 66, 72), True),
}
# Drawn by the second renderer (another drawing routine and other shades than the training data).
OTHER_RENDERER = {"stars.png", "three_shapes.png"}


def paths() -> list[Path]:
    return [IMAGES / name for name in SCENES]


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    for name, scene in SCENES.items():
        image = render_alt(scene, (256, 256)) if name in OTHER_RENDERER else render(scene, size=(256, 256))
        image.save(IMAGES / name, optimize=True)
        print(IMAGES / name)


if __name__ == "__main__":
    main()
