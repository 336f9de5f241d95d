"""What a synthetic drug class looks like, as a pure function of its index, and how one pill is drawn.

Main colour varies fastest, then shape (ordered from coarse to fine differences), then score line, size,
a second colour and the imprint: the first classes differ at a glance, and a model must look closer as the
number of classes grows (shape+colour separate 117 classes; beyond that the smaller cues decide).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Ordered so that neighbouring classes differ coarsely first (aspect ratio, corner count).
SHAPES = ("원형", "장방형", "삼각형", "사각형", "타원형", "마름모형", "육각형", "오각형", "팔각형")
SHAPES_EN = ("circle", "oblong", "triangle", "square", "oval", "diamond", "hexagon", "pentagon", "octagon")
# (Korean colour class as in the real JSON, RGB) — hues far enough apart to survive lighting jitter.
COLOURS = (
    ("하양", (236, 236, 230)), ("노랑", (238, 206, 58)), ("주황", (236, 128, 40)), ("분홍", (238, 150, 182)),
    ("빨강", (198, 40, 44)), ("갈색", (130, 82, 44)), ("연두", (160, 214, 92)), ("초록", (40, 140, 64)),
    ("청록", (32, 160, 164)), ("파랑", (48, 102, 214)), ("남색", (30, 40, 110)), ("보라", (134, 70, 170)),
    ("회색", (128, 128, 134)),
)
SCORES = ("", "-", "+")
SIZES = (1.0, 0.82, 1.18)
_ASPECT = {"타원형": 0.68, "장방형": 0.45}
_IMPRINT_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"


@dataclass(frozen=True)
class PillLook:
    index: int
    shape: str
    colour1: str
    colour2: str
    rgb1: Tuple[int, int, int]
    rgb2: Tuple[int, int, int]
    score: str
    size: float
    print_front: str
    print_back: str

    @property
    def aspect(self) -> float:
        return _ASPECT.get(self.shape, 1.0)


def kcode_for(index: int) -> str:
    """Scattered, unique K-codes like the real ones (index -> K-NNNNNN); 7919 and 99991 are coprime."""
    return f"K-{(index * 7919) % 99991 + 1:06d}"


def _imprint(index: int, salt: int) -> str:
    n, chars = (index * 2654435761 + salt * 40503 + 12345) % len(_IMPRINT_ALPHABET) ** 3, []
    for _ in range(3):
        n, r = divmod(n, len(_IMPRINT_ALPHABET))
        chars.append(_IMPRINT_ALPHABET[r])
    return "".join(chars)


@lru_cache(maxsize=None)
def pill_look(index: int) -> PillLook:
    n_shape, n_col = len(SHAPES), len(COLOURS)
    c1 = index % n_col
    shape = SHAPES[(index // n_col) % n_shape]
    rest = index // (n_shape * n_col)
    score = SCORES[rest % 3]
    size = SIZES[(rest // 3) % 3]
    c2 = (c1 + 1 + (rest // 9) % (n_col - 1)) % n_col if (rest // 9) % 2 else c1
    return PillLook(
        index=index, shape=shape, colour1=COLOURS[c1][0], colour2=COLOURS[c2][0],
        rgb1=COLOURS[c1][1], rgb2=COLOURS[c2][1], score=score, size=size,
        print_front=_imprint(index, 0), print_back=_imprint(index, 1) if index % 2 else "",
    )


def _polygon(n: int, w: float, h: float, rotation: float = -np.pi / 2):
    angles = rotation + np.arange(n) * 2 * np.pi / n
    return [(w / 2 + w / 2 * np.cos(a), h / 2 + h / 2 * np.sin(a)) for a in angles]


def _outline(draw: ImageDraw.ImageDraw, shape: str, w: int, h: int, fill, edge) -> None:
    box = (0, 0, w - 1, h - 1)
    if shape in ("원형", "타원형"):
        draw.ellipse(box, fill=fill, outline=edge, width=max(1, w // 40))
    elif shape == "장방형":
        draw.rounded_rectangle(box, radius=h // 2, fill=fill, outline=edge, width=max(1, w // 40))
    elif shape == "사각형":
        draw.rounded_rectangle(box, radius=w // 8, fill=fill, outline=edge, width=max(1, w // 40))
    else:
        sides = {"삼각형": 3, "마름모형": 4, "오각형": 5, "육각형": 6, "팔각형": 8}[shape]
        draw.polygon(_polygon(sides, w - 1, h - 1), fill=fill, outline=edge, width=max(1, w // 40))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's embedded font: nothing is downloaded
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def draw_pill(look: PillLook, width: int, back_side: bool) -> Image.Image:
    """One pill as RGBA, `width` px wide, unrotated; transparent outside the pill."""
    width = max(8, int(width))
    height = max(6, int(width * look.aspect))
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    edge = tuple(int(c * 0.55) for c in look.rgb1) + (255,)
    _outline(draw, look.shape, width, height, look.rgb1 + (255,), edge)
    if look.colour2 != look.colour1:  # two-tone: right half in the second colour
        half = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        _outline(ImageDraw.Draw(half), look.shape, width, height, look.rgb2 + (255,), edge)
        img.paste(half.crop((width // 2, 0, width, height)), (width // 2, 0))
    ink = (30, 30, 30, 255) if sum(look.rgb1) > 300 else (235, 235, 235, 255)
    if look.score and not back_side:
        draw.line((width * 0.2, height / 2, width * 0.8, height / 2), fill=ink, width=max(1, width // 30))
        if look.score == "+":
            draw.line((width / 2, height * 0.2, width / 2, height * 0.8), fill=ink, width=max(1, width // 30))
    text = look.print_back if back_side else look.print_front
    if text:
        font = _font(max(6, height // 3))
        draw.text((width / 2, height * (0.28 if look.score and not back_side else 0.5)), text,
                  fill=ink, font=font, anchor="mm")
    return img
