"""Procedurally drawn objects: a tiny vector language (ellipses, polygons, lines) and one recipe per class.

A recipe lists primitives in *object coordinates* (the image's shorter side spans [-0.5, 0.5]);
each image draws them under a small random pose (shift, rotation, scale), so images of one class
show the same product in slightly different placements, like an inspection camera does. Layout
details (where the chips of a PCB sit) come from a per-class generator, so they are identical in
every image of the class; loose items (capsules in a tray, specks on a pill) use the per-image one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from siad.data.synthetic.textures import TextureStyle, fbm, render_texture

Color = tuple[int, int, int]
Point = tuple[float, float]
_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class Prim:
    """One primitive: a filled ``ellipse`` (pts = (centre, radii, angle)), a filled ``poly`` or a ``line``.

    ``hole`` punches through to the background (a bore, the inside of a nut), so the pixel stops
    being part of the object.
    """

    kind: str
    pts: tuple
    color: Color = (0, 0, 0)
    hole: bool = False
    width: float = 0.0


@dataclass(frozen=True)
class ObjectRecipe:
    """A product: background (flat colour or material), primitives and how much the pose may vary."""

    background: Color | TextureStyle
    prims: tuple[Prim, ...]
    max_rotation: float = 6.0
    grain: float = 0.0  # relative brightness variation over the object's surface
    whole_image: bool = False  # defects may land anywhere (e.g. zipper fabric), not only on prims
    max_shift: float = 0.04
    pose_scale: float = 0.04


def circle(cx: float, cy: float, r: float, color: Color = (0, 0, 0), hole: bool = False) -> Prim:
    """A filled disc."""
    return Prim("ellipse", ((cx, cy), (r, r), 0.0), color, hole)


def ellipse(cx: float, cy: float, rx: float, ry: float, color: Color = (0, 0, 0), angle: float = 0.0,
            hole: bool = False) -> Prim:
    """A filled ellipse with radii ``rx``, ``ry`` rotated by ``angle`` degrees."""
    return Prim("ellipse", ((cx, cy), (rx, ry), angle), color, hole)


def rect(cx: float, cy: float, w: float, h: float, color: Color = (0, 0, 0), angle: float = 0.0,
         hole: bool = False) -> Prim:
    """A filled rectangle centred on (cx, cy), rotated by ``angle`` degrees."""
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return Prim("poly", tuple(_rotate_about(corners, (cx, cy), angle)), color, hole)


def capsule(cx: float, cy: float, length: float, width: float, color: Color, angle: float = 0.0,
            half: str | None = None) -> Prim:
    """A stadium (rounded bar) along x; ``half='left'``/``'right'`` draws only that half (two-tone capsules)."""
    r, straight = width / 2, max(0.0, length / 2 - width / 2)
    right_cap = [(straight + r * np.cos(t), r * np.sin(t)) for t in np.linspace(-np.pi / 2, np.pi / 2, 12)]
    left_cap = [(-straight - r * np.cos(t), -r * np.sin(t)) for t in np.linspace(-np.pi / 2, np.pi / 2, 12)]
    if half == "right":
        outline = [(0.0, r)] + [(0.0, -r)] + right_cap
    elif half == "left":
        outline = [(0.0, -r)] + [(0.0, r)] + left_cap
    else:
        outline = right_cap + left_cap
    return Prim("poly", tuple(_rotate_about(outline, (cx, cy), angle)), color)


def line(points: list[Point], color: Color, width: float) -> Prim:
    """An open polyline of thickness ``width``."""
    return Prim("line", tuple(points), color, width=width)


def _rotate_about(points: list[Point], centre: Point, angle_deg: float) -> list[Point]:
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return [(centre[0] + x * c - y * s, centre[1] + x * s + y * c) for x, y in points]


@dataclass
class _Pose:
    """Object → pixel transform: scale by the image side, rotate, translate."""

    cx: float
    cy: float
    scale: float
    angle: float
    _cs: tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        self._cs = (np.cos(np.deg2rad(self.angle)), np.sin(np.deg2rad(self.angle)))

    def point(self, p: Point) -> tuple[int, int]:
        c, s = self._cs
        x, y = p[0] * self.scale, p[1] * self.scale
        return int(round((self.cx + x * c - y * s) * _ONE)), int(round((self.cy + x * s + y * c) * _ONE))

    def length(self, v: float) -> float:
        return v * self.scale


def _draw_prim(target: np.ndarray, prim: Prim, pose: _Pose) -> None:
    """Draw ``prim`` with value 1 into the single-channel ``target``."""
    if prim.kind == "ellipse":
        centre, (rx, ry), angle = prim.pts
        axes = (max(1, int(round(pose.length(rx) * _ONE))), max(1, int(round(pose.length(ry) * _ONE))))
        cv2.ellipse(target, pose.point(centre), axes, angle + pose.angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    elif prim.kind == "poly":
        pts = np.array([pose.point(p) for p in prim.pts], np.int32)
        cv2.fillPoly(target, [pts], 1, cv2.LINE_8, _SHIFT)
    elif prim.kind == "line":
        pts = np.array([pose.point(p) for p in prim.pts], np.int32)
        thickness = max(1, int(round(pose.length(prim.width))))
        cv2.polylines(target, [pts], False, 1, thickness, cv2.LINE_8, _SHIFT)
    else:
        raise ValueError(f"unknown primitive kind {prim.kind!r}")


def _background(spec: Color | TextureStyle, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, TextureStyle):
        return render_texture(spec, h, w, rng)
    shade = 0.94 + 0.12 * fbm(h, w, rng, cell=max(h, w) / 2, octaves=1)  # uneven illumination
    return np.asarray(spec, np.float32)[None, None, :] * shade[..., None]


def render_object(recipe: ObjectRecipe, h: int, w: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image of the product.

    Returns:
        (image float HxWx3, object mask bool HxW, background float HxWx3) — the background is what
        a "missing part" defect reveals.
    """
    background = _background(recipe.background, h, w, rng)
    side = min(h, w)
    pose = _Pose(cx=w / 2 + rng.uniform(-1, 1) * recipe.max_shift * side,
                 cy=h / 2 + rng.uniform(-1, 1) * recipe.max_shift * side,
                 scale=side * (1 + rng.uniform(-1, 1) * recipe.pose_scale),
                 angle=float(rng.uniform(-1, 1) * recipe.max_rotation))
    img, fg = background.copy(), np.zeros((h, w), bool)
    stamp = np.zeros((h, w), np.uint8)
    for prim in recipe.prims:
        stamp[:] = 0
        _draw_prim(stamp, prim, pose)
        where = stamp.astype(bool)
        img[where] = background[where] if prim.hole else np.asarray(prim.color, np.float32)
        fg[where] = not prim.hole
    if recipe.grain:
        relief = 1 + recipe.grain * (fbm(h, w, rng, cell=side / 6) - 0.5)
        img = np.where(fg[..., None], img * relief[..., None], img)
    if recipe.whole_image:
        fg[:] = True
    return img, fg, background


# --------------------------------------------------------------------------------------------------
# Recipes. Each takes (class generator, image generator) and returns an ObjectRecipe.
# --------------------------------------------------------------------------------------------------
Recipe = Callable[[np.random.Generator, np.random.Generator], ObjectRecipe]


def concentric(background: Color, rings: list[tuple[float, Color]], *, grain: float = 0.1,
               extra: tuple[Prim, ...] = ()) -> Recipe:
    """Round parts seen from above (bottle mouth, nut, turned part): nested discs, then ``extra``."""
    prims = tuple(circle(0, 0, r, c) for r, c in rings) + extra

    def recipe(_class_rng: np.random.Generator, _img_rng: np.random.Generator) -> ObjectRecipe:
        return ObjectRecipe(background, prims, max_rotation=180.0, grain=grain)

    return recipe


def _polar(radius: float, angle_deg: float) -> Point:
    return radius * np.cos(np.deg2rad(angle_deg)), radius * np.sin(np.deg2rad(angle_deg))


def cable(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """Cable cross-section: grey sheath with three coloured wires and copper cores."""
    prims = [circle(0, 0, 0.45, (165, 165, 160))]
    for angle, colour in zip((-90, 30, 150), ((40, 150, 60), (40, 70, 190), (120, 80, 50)), strict=True):
        x, y = _polar(0.21, angle)
        prims += [circle(x, y, 0.17, colour), circle(x, y, 0.08, (200, 130, 70))]
    return ObjectRecipe((60, 60, 60), tuple(prims), max_rotation=5.0)


def two_tone_capsule(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A black/orange hard capsule lying horizontally, with a printed mark."""
    prims = (capsule(0, 0, 0.8, 0.3, (25, 25, 25), half="left"), capsule(0, 0, 0.8, 0.3, (220, 120, 30), half="right"))
    mark = tuple(line([(0.08 + 0.07 * k, -0.05), (0.08 + 0.07 * k, 0.05)], (90, 40, 10), 0.015) for k in range(3))
    return ObjectRecipe((200, 200, 195), prims + mark, max_rotation=3.0)


def hazelnut(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A hazelnut from above: brown grained ellipse with a darker tip."""
    prims = (ellipse(0, 0, 0.36, 0.32, (150, 95, 50)), ellipse(0, -0.25, 0.07, 0.05, (90, 60, 35)))
    return ObjectRecipe((12, 12, 12), prims, max_rotation=180.0, grain=0.35)


def metal_nut(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A nut with four notches in its rim and a bore."""
    notches = tuple(circle(*_polar(0.43, 45 + 90 * k), 0.09, hole=True) for k in range(4))
    prims = (circle(0, 0, 0.42, (160, 160, 170)), circle(0, 0, 0.25, (125, 125, 135))) + notches + (
        circle(0, 0, 0.15, hole=True),)
    return ObjectRecipe((15, 15, 15), prims, max_rotation=180.0, grain=0.15)


def pill(_c: np.random.Generator, img_rng: np.random.Generator) -> ObjectRecipe:
    """A white oblong pill with random red specks and an imprint."""
    specks = tuple(circle(img_rng.uniform(-0.33, 0.33), img_rng.uniform(-0.12, 0.12), img_rng.uniform(0.008, 0.016),
                          (170, 60, 50)) for _ in range(12))
    imprint = (line([(-0.06, -0.06), (-0.06, 0.06)], (150, 40, 40), 0.02), line([(0.04, -0.06), (0.04, 0.06)],
                                                                            (150, 40, 40), 0.02))
    return ObjectRecipe((50, 45, 40), (ellipse(0, 0, 0.42, 0.2, (235, 230, 220)),) + specks + imprint, max_rotation=3.0)


def screw(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A screw lying at any angle: head, shaft, tip and thread lines."""
    threads = tuple(line([(x, -0.045), (x + 0.015, 0.045)], (45, 45, 45), 0.012) for x in np.arange(-0.16, 0.3, 0.04))
    prims = (circle(-0.3, 0, 0.11, (75, 75, 75)), rect(0.05, 0, 0.5, 0.08, (95, 95, 95)),
             Prim("poly", ((0.3, -0.04), (0.4, 0.0), (0.3, 0.04)), (95, 95, 95))) + threads
    return ObjectRecipe((215, 215, 215), prims, max_rotation=180.0)


def toothbrush(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A toothbrush head from above: handle and a grid of blue/white tufts."""
    blue, white = (40, 90, 200), (240, 240, 240)
    tufts = tuple(circle(-0.09 + 0.06 * col, -0.4 + 0.07 * row, 0.027, blue if (row + col) % 2 else white)
                  for row in range(8) for col in range(4))
    return ObjectRecipe((30, 30, 35), (rect(0, 0, 0.3, 1.1, (225, 225, 230)),) + tufts, max_rotation=3.0)


def transistor(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A TO-220 transistor: metal tab with a hole, black body and three legs."""
    legs = tuple(line([(x, 0.1), (x, 0.47)], (200, 190, 160), 0.03) for x in (-0.1, 0.0, 0.1))
    prims = (rect(0, -0.27, 0.36, 0.16, (180, 180, 185)), circle(0, -0.27, 0.04, hole=True),
             rect(0, -0.04, 0.36, 0.3, (25, 25, 25))) + legs
    return ObjectRecipe((170, 170, 160), prims, max_rotation=5.0)


ZIPPER_FABRIC = TextureStyle("weave", (70, 70, 70), (130, 130, 130), {"period": 2.5})


def zipper(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A zipper on fabric: two interlocking columns of teeth on a tape; defects anywhere."""
    teeth = tuple(rect(-0.04 if k % 2 else 0.04, -0.55 + 0.045 * k, 0.12, 0.03, (185, 185, 185)) for k in range(25))
    tape = rect(0, 0, 0.2, 1.2, (95, 95, 95))
    return ObjectRecipe(ZIPPER_FABRIC, (tape,) + teeth, max_rotation=2.0, whole_image=True)


def candle(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """Four tea-light candles in a 2x2 arrangement."""
    prims: list[Prim] = []
    for x in (-0.22, 0.22):
        for y in (-0.22, 0.22):
            prims += [circle(x, y, 0.19, (235, 230, 220)), circle(x, y, 0.15, (222, 216, 204)),
                      circle(x, y, 0.02, (40, 40, 40))]
    return ObjectRecipe((45, 40, 40), tuple(prims), max_rotation=3.0)


def tray_of_capsules(_c: np.random.Generator, img_rng: np.random.Generator) -> ObjectRecipe:
    """Loose green capsules: a jittered 3x2 grid, each at its own angle (varies per image)."""
    prims = tuple(capsule(x + img_rng.uniform(-0.04, 0.04), y + img_rng.uniform(-0.04, 0.04), 0.24, 0.1,
                          (110, 180, 100), angle=float(img_rng.uniform(0, 180)))
                  for x in (-0.3, 0.0, 0.3) for y in (-0.18, 0.18))
    return ObjectRecipe((30, 35, 30), prims, max_rotation=2.0)


def cashew(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A cashew: a crescent cut from an ellipse."""
    prims = (ellipse(0, 0.03, 0.36, 0.24, (215, 185, 130)), ellipse(0, -0.17, 0.26, 0.15, hole=True))
    return ObjectRecipe((25, 25, 25), prims, max_rotation=15.0, grain=0.2)


def chewing_gum(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A white rounded chewing-gum pellet."""
    return ObjectRecipe((60, 70, 90), (capsule(0, 0, 0.62, 0.42, (240, 240, 240)),), max_rotation=5.0, grain=0.08)


def fryum(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A wheel-shaped snack: disc with a hub and six spoke openings."""
    openings = tuple(ellipse(*_polar(0.24, 60 * k), 0.09, 0.05, angle=60 * k, hole=True) for k in range(6))
    prims = (circle(0, 0, 0.4, (225, 175, 90)),) + openings + (circle(0, 0, 0.07, hole=True),)
    return ObjectRecipe((90, 75, 60), prims, max_rotation=180.0, grain=0.25)


def macaroni(background: Color | TextureStyle) -> Recipe:
    """Four small macaroni pieces in a 2x2 arrangement on ``background``."""

    def recipe(class_rng: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
        prims = tuple(capsule(x, y, 0.22, 0.1, (225, 195, 110), angle=float(class_rng.uniform(0, 180)))
                      for x in (-0.22, 0.22) for y in (-0.22, 0.22))
        return ObjectRecipe(background, prims, max_rotation=4.0, grain=0.1)

    return recipe


def pcb(board: Color) -> Recipe:
    """A circuit board: chips, pads and traces at class-fixed places on a ``board``-coloured rectangle."""

    def recipe(class_rng: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
        prims: list[Prim] = [rect(0, 0, 0.9, 0.7, board)]
        for _ in range(4):
            x, y = class_rng.uniform(-0.3, 0.3), class_rng.uniform(-0.22, 0.22)
            prims.append(line([(x, y), (class_rng.uniform(-0.4, 0.4), y)], (60, 150, 90), 0.015))
        for _ in range(3):
            prims.append(rect(class_rng.uniform(-0.3, 0.3), class_rng.uniform(-0.2, 0.2),
                              class_rng.uniform(0.1, 0.22), class_rng.uniform(0.08, 0.16), (20, 20, 20)))
        for _ in range(6):
            prims.append(circle(class_rng.uniform(-0.4, 0.4), class_rng.uniform(-0.3, 0.3), 0.025, (210, 180, 90)))
        return ObjectRecipe((200, 200, 200), tuple(prims), max_rotation=3.0)

    return recipe


def pipe_fryum(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A ridged tube-shaped snack."""
    ridges = tuple(line([(x, -0.13), (x, 0.13)], (200, 130, 50), 0.02) for x in np.arange(-0.28, 0.3, 0.07))
    return ObjectRecipe((70, 55, 45), (capsule(0, 0, 0.75, 0.3, (230, 160, 70)),) + ridges, max_rotation=5.0)


def bracket(colour: Color, background: Color) -> Recipe:
    """An L-shaped sheet-metal bracket with two mounting holes."""
    outline = ((-0.35, -0.35), (0.35, -0.35), (0.35, -0.18), (-0.18, -0.18), (-0.18, 0.35), (-0.35, 0.35))
    prims = (Prim("poly", outline, colour), circle(0.24, -0.265, 0.045, hole=True),
             circle(-0.265, 0.24, 0.045, hole=True))

    def recipe(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
        return ObjectRecipe(background, prims, max_rotation=8.0, grain=0.1)

    return recipe


def connector(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A connector housing with two rows of pins."""
    pins = tuple(rect(-0.25 + 0.1 * k, y, 0.05, 0.08, (200, 170, 70)) for k in range(6) for y in (-0.06, 0.06))
    return ObjectRecipe((190, 190, 190), (rect(0, 0, 0.7, 0.34, (40, 40, 45)),) + pins, max_rotation=5.0)


def metal_plate(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A brushed steel plate with four corner holes."""
    holes = tuple(circle(x, y, 0.05, hole=True) for x in (-0.3, 0.3) for y in (-0.3, 0.3))
    return ObjectRecipe((40, 40, 40), (rect(0, 0, 0.82, 0.82, (150, 150, 160)),) + holes, max_rotation=4.0, grain=0.3)


def tubes(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """Four parallel white plastic tubes with darker outlines."""
    prims: list[Prim] = []
    for x in (-0.3, -0.1, 0.1, 0.3):
        prims += [capsule(x, 0, 0.88, 0.16, (180, 180, 185), angle=90),
                  capsule(x, 0, 0.84, 0.12, (240, 240, 240), angle=90)]
    return ObjectRecipe((60, 60, 65), tuple(prims), max_rotation=3.0)


def machined_block(_c: np.random.Generator, _i: np.random.Generator) -> ObjectRecipe:
    """A rectangular machined part with two bores and a groove (BTAD product 03)."""
    prims = (rect(0, 0, 0.9, 0.55, (95, 100, 105)), line([(-0.4, 0.1), (0.4, 0.1)], (60, 62, 65), 0.03),
             circle(-0.28, -0.1, 0.07, hole=True), circle(0.28, -0.1, 0.07, hole=True))
    return ObjectRecipe((200, 200, 200), prims, max_rotation=3.0, grain=0.2)
