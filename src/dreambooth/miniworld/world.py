"""The miniature world: one toy on a flat background, 32x32 RGB, drawn procedurally.

Pretraining sees 6 shapes x 6 colours x 5 backgrounds (a colour is never drawn on the background
of the same name: 168 combinations) with captions such as "a photo of a red circle toy on a blue
background". Every caption names the class noun "toy"; each attribute is dropped with
probability 0.35 ("a photo of a toy"), and 10% of captions are empty (for classifier-free
guidance).

The held-out *subjects* are what DreamBooth is asked to learn: each is a shape AND a pattern
that pretraining never shows (a heart with red/yellow 8-px bands, ...). Each has 5 instance
images on 3 backgrounds; its other 2 backgrounds are held out for recontextualisation prompts
("a photo of sks toy on a blue background"), as in the DreamBooth paper's prompt fidelity.

Images are drawn with PIL at 4x (128x128) and box-downsampled, so edges are anti-aliased.
Everything is a pure function of integer seeds: `world_example(seed)` is the same image and
caption on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # output resolution in pixels
SCALE = 4  # drawn at SIZE * SCALE, then downsampled
CLASS_NOUN = "toy"
IDENTIFIER = "sks"  # the rare token of the DreamBooth paper and of SD DreamBooth tutorials
DROP_P = 0.35  # probability of dropping each attribute from a caption
EMPTY_P = 0.10  # probability of an empty caption

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 130, 30),
}
BACKGROUNDS = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "blue": (110, 150, 230),
    "green": (120, 200, 120),
}


@dataclass(frozen=True)
class Subject:
    """A held-out subject: a shape and a two-colour pattern never seen in pretraining."""

    name: str
    shape: str  # one of SUBJECT_SHAPES
    pattern: str  # "hbands" | "halves" | "checker" | "dbands"
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    instance_backgrounds: tuple[str, ...]  # the backgrounds of its instance images
    heldout_backgrounds: tuple[str, ...]  # never in its instance images: recontextualisation prompts

    @property
    def pattern_name(self) -> str:
        """The subject's entry in the classifier's colour head."""
        return f"{self.name}-pattern"


SUBJECTS = {
    s.name: s
    for s in (
        Subject("banded_heart", "heart", "hbands", ((220, 40, 40), (240, 210, 40)), ("white", "gray", "black"), ("blue", "green")),
        Subject("split_moon", "moon", "halves", ((40, 200, 210), (220, 50, 200)), ("white", "black", "green"), ("gray", "blue")),
        Subject("checkered_arrow", "arrow", "checker", ((170, 230, 50), (30, 40, 150)), ("white", "gray", "green"), ("black", "blue")),
        Subject("striped_ring", "ring", "dbands", ((250, 150, 190), (20, 130, 120)), ("white", "green", "blue"), ("black", "gray")),
    )
}
SUBJECT_SHAPES = tuple(s.shape for s in SUBJECTS.values())

# Label spaces of the attribute classifier: world attributes first, then the subjects'.
ALL_SHAPES = SHAPES + SUBJECT_SHAPES
ALL_COLOURS = tuple(COLOURS) + tuple(s.pattern_name for s in SUBJECTS.values())
ALL_BACKGROUNDS = tuple(BACKGROUNDS)
SUBJECT_LABELS = ("none",) + tuple(SUBJECTS)  # is-subject head: which subject, or none
BAND = 8  # pattern period in output pixels; 4-px stripes do not survive the VAE, 8-px bands do


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image."""

    shape: str  # in ALL_SHAPES
    colour: str  # in ALL_COLOURS (a colour name or a subject's pattern name)
    background: str  # in BACKGROUNDS
    cx: float = 16.0  # centre, output pixels
    cy: float = 16.0
    size: float = 22.0  # bounding size, output pixels
    angle: float = 0.0  # degrees

    @property
    def subject(self) -> Optional[str]:
        """The subject this scene shows (its shape and its pattern), or None."""
        for s in SUBJECTS.values():
            if self.shape == s.shape and self.colour == s.pattern_name:
                return s.name
        return None

    def labels(self) -> dict[str, int]:
        """Class indices for the attribute classifier's four heads."""
        return {
            "shape": ALL_SHAPES.index(self.shape),
            "colour": ALL_COLOURS.index(self.colour),
            "background": ALL_BACKGROUNDS.index(self.background),
            "subject": SUBJECT_LABELS.index(self.subject or "none"),
        }


# ---------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------

def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of `shape` in unit coordinates (about [-1, 1]^2), y pointing down."""
    if shape in ("circle", "ring"):
        return [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5), -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5))
                for k in range(10)]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        return [(16 * math.sin(t) ** 3 / 16.5, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16.5 + 0.1)
                for t in ts]
    if shape == "arrow":
        return [(-1.0, -0.3), (0.1, -0.3), (0.1, -0.8), (1.0, 0.0), (0.1, 0.8), (0.1, 0.3), (-1.0, 0.3)]
    if shape == "moon":  # outer circle; the bite is cut in _mask
        return _polygon("circle")
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def _mask(scene: Scene) -> Image.Image:
    """The object's silhouette at 4x, an 'L' image."""
    n = SIZE * SCALE
    r = scene.size * SCALE / 2
    cx, cy = scene.cx * SCALE, scene.cy * SCALE
    rot = math.radians(scene.angle)
    c, s = math.cos(rot), math.sin(rot)

    def place(points, scale=1.0, dx=0.0, dy=0.0):
        return [(cx + r * ((x * scale + dx) * c - (y * scale + dy) * s), cy + r * ((x * scale + dx) * s + (y * scale + dy) * c))
                for x, y in points]

    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(place(_polygon(scene.shape)), fill=255)
    if scene.shape == "ring":
        draw.polygon(place(_polygon("circle"), scale=0.5), fill=0)
    elif scene.shape == "moon":
        draw.polygon(place(_polygon("circle"), scale=0.85, dx=0.55, dy=-0.25), fill=0)
    return mask


def _fill(scene: Scene) -> Image.Image:
    """The object's paint at 4x: a flat colour, or a subject's pattern in the object's frame."""
    n = SIZE * SCALE
    if scene.colour in COLOURS:
        return Image.new("RGB", (n, n), COLOURS[scene.colour])
    subject = next(s for s in SUBJECTS.values() if s.pattern_name == scene.colour)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    # object-frame coordinates in output pixels, origin at the object's centre
    rot = math.radians(scene.angle)
    u = ((xs - scene.cx * SCALE) * math.cos(rot) + (ys - scene.cy * SCALE) * math.sin(rot)) / SCALE
    v = (-(xs - scene.cx * SCALE) * math.sin(rot) + (ys - scene.cy * SCALE) * math.cos(rot)) / SCALE
    if subject.pattern == "hbands":
        which = np.floor(v / BAND + 0.5) % 2
    elif subject.pattern == "halves":  # top / bottom
        which = (v > 0).astype(np.float32)
    elif subject.pattern == "checker":
        which = (np.floor(u / BAND) + np.floor(v / BAND)) % 2
    elif subject.pattern == "dbands":
        which = np.floor((u + v) / (BAND * 1.41)) % 2
    else:
        raise ValueError(f"unknown pattern {subject.pattern!r}")
    a, b = (np.array(col, dtype=np.float32) for col in subject.colours)
    img = np.where(which[..., None] > 0, b, a)
    return Image.fromarray(img.astype(np.uint8))


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as a 32x32 RGB image."""
    n = SIZE * SCALE
    canvas = Image.new("RGB", (n, n), BACKGROUNDS[scene.background])
    canvas.paste(_fill(scene), (0, 0), _mask(scene))
    return canvas.resize((SIZE, SIZE), Image.BOX)


# ---------------------------------------------------------------------------------------
# sampling scenes and captions
# ---------------------------------------------------------------------------------------

def _pose(rng: np.random.Generator) -> dict[str, float]:
    return {"cx": 16 + rng.uniform(-3, 3), "cy": 16 + rng.uniform(-3, 3), "size": rng.uniform(18, 24), "angle": rng.uniform(-12, 12)}


def world_combinations() -> list[tuple[str, str, str]]:
    """The 168 (shape, colour, background) triples of pretraining."""
    return [(sh, co, bg) for sh in SHAPES for co in COLOURS for bg in BACKGROUNDS if co != bg]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn world scene (never a subject)."""
    combos = world_combinations()
    shape, colour, background = combos[rng.integers(len(combos))]
    return Scene(shape, colour, background, **_pose(rng))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(shape: Optional[str] = None, colour: Optional[str] = None, background: Optional[str] = None,
             identifier: Optional[str] = None) -> str:
    """A prompt in the world's caption grammar; missing attributes are left out.

    >>> describe("circle", "red", "blue")
    'a photo of a red circle toy on a blue background'
    >>> describe(identifier="sks", background="green")
    'a photo of sks toy on a green background'
    """
    words = " ".join(w for w in (colour, shape, CLASS_NOUN) if w)
    noun = f"{identifier} {words}" if identifier else f"{_article(words)} {words}"
    return f"a photo of {noun}" + (f" on {_article(background)} {background} background" if background else "")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A pretraining caption: each attribute dropped with p=DROP_P, empty with p=EMPTY_P."""
    if rng.random() < EMPTY_P:
        return ""
    keep = rng.random(3) >= DROP_P
    return describe(scene.shape if keep[0] else None, scene.colour if keep[1] else None, scene.background if keep[2] else None)


def world_example(seed: int) -> tuple[Image.Image, str, Scene]:
    """Pretraining example number `seed`: (image, caption, scene), the same on every machine."""
    rng = np.random.default_rng([seed, 1])
    scene = sample_scene(rng)
    return render(scene), caption(scene, rng), scene


def generic_image(seed: int) -> Image.Image:
    """A generic procedural image (polygons, ellipses, stripes, random colours) for the VAE.

    Training the autoencoder on these as well as on the world lets it represent subjects that
    the diffusion model never saw.
    """
    rng = np.random.default_rng([seed, 2])
    n = SIZE * SCALE
    img = Image.new("RGB", (n, n), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.4:  # a striped background or stripes over it
        period = int(rng.integers(6, 17)) * SCALE
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        diagonal = rng.random() < 0.5
        for x in range(-n, 2 * n, period):
            if diagonal:
                draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + n, n), (x + n, n)], fill=col)
            else:
                draw.rectangle([x, 0, x + period // 2, n], fill=col)
    for _ in range(int(rng.integers(1, 4))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0.15 * n, 0.85 * n, 2)
        r = rng.uniform(0.1 * n, 0.4 * n)
        if rng.random() < 0.5:
            k = int(rng.integers(3, 9))
            phase = rng.uniform(0, 2 * math.pi)
            radii = r * rng.uniform(0.5, 1.0, k)
            pts = [(cx + radii[i] * math.cos(phase + 2 * math.pi * i / k), cy + radii[i] * math.sin(phase + 2 * math.pi * i / k))
                   for i in range(k)]
            draw.polygon(pts, fill=col)
        else:
            ry = r * rng.uniform(0.4, 1.0)
            draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=col)
    if rng.random() < 0.5:  # a random subject-like pattern on a random shape
        scene = Scene(str(rng.choice(ALL_SHAPES)), str(rng.choice(ALL_COLOURS)), "white", **_pose(rng))
        img.paste(_fill(scene), (0, 0), _mask(scene))
    return img.resize((SIZE, SIZE), Image.BOX)


# ---------------------------------------------------------------------------------------
# held-out subjects: instance images and evaluation prompts
# ---------------------------------------------------------------------------------------

def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise KeyError(f"unknown subject {name!r}; known: {', '.join(SUBJECTS)}")
    return SUBJECTS[name]


def subject_scene(subject: Subject, background: str, rng: np.random.Generator) -> Scene:
    return Scene(subject.shape, subject.pattern_name, background, **_pose(rng))


def instance_scenes(name: str, n: int = 5) -> list[Scene]:
    """The subject's `n` instance scenes, cycling through its instance backgrounds."""
    subject = get_subject(name)
    rng = np.random.default_rng([list(SUBJECTS).index(name), 3])
    bgs = subject.instance_backgrounds
    return [subject_scene(subject, bgs[i % len(bgs)], rng) for i in range(n)]


def instance_images(name: str, n: int = 5) -> list[Image.Image]:
    return [render(s) for s in instance_scenes(name, n)]


FRAMES = (None, "left", "right", "top", "bottom")  # where the 32x32 scene sits in a mixed-aspect photo


def mixed_aspect_images(name: str, n: int = 5) -> list[Image.Image]:
    """The instance scenes in mixed frames: one square, then 64x32 and 32x64 photos with the subject's
    scene at the left, right, top or bottom (the rest is plain background), as photos framed off-centre.
    A square centre crop of those cuts the subject in half; aspect-ratio buckets keep it."""
    images = []
    for i, scene in enumerate(instance_scenes(name, n)):
        where = FRAMES[i % len(FRAMES)]
        image = render(scene)
        if where is not None:
            size = (2 * SIZE, SIZE) if where in ("left", "right") else (SIZE, 2 * SIZE)
            frame = Image.new("RGB", size, BACKGROUNDS[scene.background])  # the scene's own flat background: seamless
            frame.paste(image, (SIZE if where == "right" else 0, SIZE if where == "bottom" else 0))
            image = frame
        images.append(image)
    return images


def write_instance_images(name: str, folder: str | Path, n: int = 5, mixed_aspect: bool = False,
                          captions: bool = False) -> list[Path]:
    """Write subject `name`'s instance images as PNGs (`<name>_00.png`, ...) to `folder`
    (`mixed_aspect`: in the wide and tall frames of `mixed_aspect_images`; `captions`: with a caption file
    beside each that names its background, "a photo of sks toy on a white background", as a user who
    captions their photos would, so that the background is said in words instead of bound to the identifier)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    images = mixed_aspect_images(name, n) if mixed_aspect else instance_images(name, n)
    for i, (img, scene) in enumerate(zip(images, instance_scenes(name, n))):
        path = folder / f"{name}_{i:02d}.png"
        img.save(path)
        caption_path = path.with_suffix(".txt")
        if captions:
            caption_path.write_text(describe(identifier=IDENTIFIER, background=scene.background) + "\n")
        else:
            caption_path.unlink(missing_ok=True)  # a folder written with captions before: the concept's prompt again
        paths.append(path)
    return paths


def instance_prompt(identifier: str = IDENTIFIER) -> str:
    """'a photo of sks toy': the rare identifier plus the class noun."""
    return describe(identifier=identifier)


def class_prompt() -> str:
    """'a photo of a toy': the class prompt for prior preservation and class drift."""
    return describe()


def recontext_prompts(name: str, identifier: str = IDENTIFIER) -> dict[str, str]:
    """Held-out background -> 'a photo of sks toy on a <background> background'."""
    return {bg: describe(identifier=identifier, background=bg) for bg in get_subject(name).heldout_backgrounds}


def to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> float32 array (3, H, W) in [-1, 1], the VAE's input range."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0

