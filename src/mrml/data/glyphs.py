"""`glyphs`: the embedded few-shot set, Omniglot-like characters drawn from matplotlib's bundled fonts.

A class is one Unicode character covered by at least two of the DejaVu, STIX and Computer Modern
faces that ship with matplotlib (Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic,
Canadian syllabics, Tifinagh, math symbols, arrows, box drawing, ...), with visual near-duplicates
(Latin A / Greek Alpha / Cyrillic A, o / O, ...) removed. Each sample draws a random face, stroke
width, affine map, elastic warp, contrast and noise, so the samples of a class vary like
handwriting. Images are uint8 28x28, strokes bright on black (inverted Omniglot). The generated
arrays are cached under `$MRML_CACHE`, `$XDG_CACHE_HOME/mrml` or `~/.cache/mrml`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

from ..errors import DataError, UsageError
from .base import SPLITS, ArrayClassImages, FewShotDataset, to_tensor
from .formats.splits import ClassSplit, load_split
from .registry import register

VERSION = 1
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

# Faces whose character map is Unicode.
_UNICODE_FACES = tuple(
    f"{family}{style}.ttf"
    for family, styles in (
        ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
        ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
    )
    for style in styles
)
_DIGITS = "0123456789"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Computer Modern faces use TeX encodings: trust them only where those agree with Unicode.
_TEX_FACES = {
    "cmr10.ttf": _LETTERS + _DIGITS,
    "cmb10.ttf": _LETTERS + _DIGITS,
    "cmss10.ttf": _LETTERS + _DIGITS,
    "cmti10.ttf": _LETTERS + _DIGITS,
    "cmtt10.ttf": _LETTERS + _DIGITS,
    "cmmi10.ttf": _LETTERS,
    "cmsy10.ttf": _LETTERS[:26],
}

# Unicode ranges the classes are drawn from, in priority order (a near-duplicate keeps the earlier
# one), each with the most classes it may contribute (spread evenly over the range).
_RANGES: tuple[tuple[str, int, int, int], ...] = (
    ("Basic Latin", 0x0021, 0x007E, 94),
    ("Latin-1 Supplement", 0x00A1, 0x00FF, 60),
    ("Latin Extended-A", 0x0100, 0x017F, 50),
    ("Latin Extended-B", 0x0180, 0x024F, 60),
    ("IPA Extensions", 0x0250, 0x02AF, 40),
    ("Greek and Coptic", 0x0370, 0x03FF, 60),
    ("Cyrillic", 0x0400, 0x052F, 90),
    ("Armenian", 0x0531, 0x058A, 60),
    ("Hebrew", 0x05D0, 0x05F4, 30),
    ("Arabic", 0x0620, 0x06FF, 50),
    ("NKo", 0x07C0, 0x07FF, 30),
    ("Lao", 0x0E80, 0x0EFF, 30),
    ("Georgian", 0x10A0, 0x10FF, 60),
    ("Canadian Syllabics", 0x1400, 0x167F, 110),
    ("Ogham", 0x1680, 0x169F, 20),
    ("Latin Extended Additional", 0x1E00, 0x1EFF, 40),
    ("Greek Extended", 0x1F00, 0x1FFF, 25),
    ("Letterlike Symbols", 0x2100, 0x214F, 30),
    ("Number Forms", 0x2150, 0x218F, 10),
    ("Arrows", 0x2190, 0x21FF, 50),
    ("Mathematical Operators", 0x2200, 0x22FF, 90),
    ("Miscellaneous Technical", 0x2300, 0x23FF, 50),
    ("Box Drawing", 0x2500, 0x257F, 40),
    ("Geometric Shapes", 0x25A0, 0x25FF, 35),
    ("Miscellaneous Symbols", 0x2600, 0x26FF, 60),
    ("Dingbats", 0x2700, 0x27BF, 40),
    ("Miscellaneous Mathematical Symbols-A", 0x27C0, 0x27EF, 20),
    ("Supplemental Arrows-A", 0x27F0, 0x27FF, 10),
    ("Supplemental Arrows-B", 0x2900, 0x297F, 40),
    ("Miscellaneous Mathematical Symbols-B", 0x2980, 0x29FF, 40),
    ("Supplemental Mathematical Operators", 0x2A00, 0x2AFF, 50),
    ("Braille Patterns", 0x2800, 0x28FF, 30),
    ("Georgian Supplement", 0x2D00, 0x2D2F, 20),
    ("Tifinagh", 0x2D30, 0x2D7F, 40),
    ("Lisu", 0xA4D0, 0xA4FF, 25),
    ("Cyrillic Extended-B", 0xA640, 0xA69F, 20),
    ("Latin Extended-D", 0xA720, 0xA7FF, 40),
    ("Old Italic", 0x10300, 0x1032F, 20),
)

RENDER = 64  # side of the working canvas (pixels) before the final downsampling
_FIT = 0.78  # the glyph's longer side fills this share of the canvas before the random affine
_CANON = 24  # side of the canonical bitmap used to spot blank glyphs and near-duplicates
_MIN_INK = 0.02  # canonical renderings with less mean ink than this count as blank
_DUP_DIST = 0.12  # canonical renderings closer than this (see `_distances`) are near-duplicates

_warned_cache = False


# ----------------------------------------------------------------------------- fonts and classes


@functools.lru_cache(maxsize=None)
def _charmap(face: str) -> frozenset[int]:
    if face in _TEX_FACES:
        return frozenset(map(ord, _TEX_FACES[face]))
    return frozenset(FT2Font(str(FONT_DIR / face)).get_charmap())


@functools.lru_cache(maxsize=None)
def _font(face: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / face), size, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=None)
def _faces() -> tuple[str, ...]:
    return tuple(f for f in _UNICODE_FACES + tuple(_TEX_FACES) if (FONT_DIR / f).is_file())


def _drawable(cp: int) -> bool:
    """A visible, self-standing character: letters, digits, punctuation and symbols, no compatibility forms."""
    ch = chr(cp)
    return unicodedata.category(ch)[0] in "LNPS" and unicodedata.normalize("NFKC", ch) == ch


def _faces_for(cp: int) -> tuple[str, ...]:
    """The faces that draw `cp` with a non-empty glyph."""
    ch = chr(cp)
    out = []
    for face in _faces():
        if cp in _charmap(face):
            left, top, right, bottom = _font(face, 32).getbbox(ch)
            if right > left and bottom > top:
                out.append(face)
    return tuple(out)


def _glyph(ch: str, face: str, size: int, stroke: int) -> Image.Image | None:
    """`ch` drawn in `face` (bright on black), cropped to its ink; None when it leaves no ink."""
    font = _font(face, size)
    left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
    if right <= left or bottom <= top:
        return None
    img = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    box = img.getbbox()
    return None if box is None else img.crop(box)


def _draw(ch: str, face: str, size: int, stroke: int, canvas: int) -> np.ndarray:
    """`ch` scaled to fit and centred on a square canvas, no random change; float32 in [0,1]."""
    out = np.zeros((canvas, canvas), np.float32)
    img = _glyph(ch, face, size, stroke)
    if img is None:
        return out
    w, h = img.size
    scale = _FIT * canvas / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    x0, y0 = (canvas - nw) // 2, (canvas - nh) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(img, np.float32) / 255.0
    return out


def _canonical(cp: int, face: str) -> np.ndarray:
    """`cp` drawn plainly in `face` at `_CANON` pixels, lightly blurred, flattened."""
    img = np.pad(_draw(chr(cp), face, 48, 0, _CANON), 1)
    blur = 4 * img[1:-1, 1:-1] + img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:]
    return (blur / 8).ravel()


def _candidates() -> list[tuple[int, int, tuple[str, ...]]]:
    """(range index, code point, faces) of every drawable character covered by at least two faces."""
    covered = set().union(*(_charmap(f) for f in _faces()))
    out, seen = [], set()
    for r, (_, lo, hi, _) in enumerate(_RANGES):
        for cp in range(lo, hi + 1):
            if cp in covered and cp not in seen and _drawable(cp):
                seen.add(cp)
                faces = _faces_for(cp)
                if len(faces) >= 2:
                    out.append((r, cp, faces))
    return out


def _distances(bitmaps: np.ndarray) -> np.ndarray:
    """Pairwise |a-b|^2 / (|a|^2 + |b|^2): 0 for equal renderings, 1 for disjoint ones."""
    sq = (bitmaps * bitmaps).sum(axis=1)
    return 1.0 - 2.0 * (bitmaps @ bitmaps.T) / (sq[:, None] + sq[None, :] + 1e-9)


def _dedup(bitmaps: np.ndarray) -> np.ndarray:
    """Indices of the rows to keep: non-blank, and not a near-duplicate of an earlier kept row."""
    dist = _distances(bitmaps.astype(np.float32))
    kept = np.zeros(len(bitmaps), dtype=bool)
    for i in range(len(bitmaps)):
        kept[i] = bitmaps[i].mean() >= _MIN_INK and not (dist[i, kept] < _DUP_DIST).any()
    return np.flatnonzero(kept)


def _spread(items: list, cap: int) -> list:
    """At most `cap` of `items`, evenly spaced (deterministic)."""
    if len(items) <= cap:
        return items
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, cap)).astype(int))
    return [items[i] for i in idx]


@functools.lru_cache(maxsize=None)
def _class_table() -> tuple[tuple[int, tuple[str, ...]], ...]:
    cands = _candidates()
    bitmaps = np.stack([_canonical(cp, faces[0]) for _, cp, faces in cands])
    kept = [cands[i] for i in _dedup(bitmaps)]
    table = []
    for r, (_, _, _, cap) in enumerate(_RANGES):
        table += [(cp, faces) for rr, cp, faces in _spread([c for c in kept if c[0] == r], cap)]
    return tuple(table)


def glyph_classes() -> list[int]:
    """The code points of the classes, in a fixed order (deterministic for a given matplotlib)."""
    return [cp for cp, _ in _class_table()]


def class_name(cp: int) -> str:
    return f"U+{cp:04X} {chr(cp)}"


# ----------------------------------------------------------------------------- split files (glyph_splits makes them)

SCRIPT_SPLIT = Path(__file__).parent / "splits" / "glyphs_scripts.json"
SHIPPED = {"glyphs:scripts": SCRIPT_SPLIT}  # short names of the shipped split files (mrml.data.glyph_splits)


def read_split(split_file: str | Path) -> ClassSplit:
    """The split file (or shipped short name) checked for shape: three non-empty, class-disjoint lists."""
    text = str(split_file)
    if text.startswith("glyphs:") and text not in SHIPPED:
        raise DataError(f"unknown shipped glyphs split {text!r}: expected {', '.join(SHIPPED)} or a JSON file path")
    return load_split("glyphs", SHIPPED.get(text, split_file))


def file_split_ids(split: ClassSplit, codepoints: np.ndarray) -> np.ndarray:
    """Class -> split index (0 train, 1 validation, 2 test, -1 not in the file) for the dataset's classes."""
    index = {class_name(int(cp)): i for i, cp in enumerate(codepoints)}
    out = np.full(len(codepoints), -1, dtype=np.int8)
    for sid, part in enumerate(SPLITS):
        names = split.classes[part]
        unknown = [n for n in names if n not in index]
        if unknown:
            regen = " (regenerate it: python -m mrml.data.glyph_splits OUT.json)" if split.source == str(SCRIPT_SPLIT) else ""
            raise DataError(
                f"split file {split.source} names {len(unknown)} {part} classes that glyphs does not have, e.g. "
                f"{unknown[0]!r}: glyphs classes are named 'U+<hex code point> <character>', e.g. "
                f"{class_name(int(codepoints[0]))!r}{regen}"
            )
        if len(names) < 2:
            raise DataError(f"split file {split.source} has {len(names)} {part} class: an episode needs at least 2 "
                            f"classes (as many as --ways), so list more under {part!r}")
        out[[index[n] for n in names]] = sid
    return out


# ----------------------------------------------------------------------------- samples

_SIZES = (48, 56, 64)  # font sizes (pixels): PIL stroke widths are absolute, so this varies weight
_MAX_ROTATION = np.deg2rad(15.0)
_SCALE = (0.8, 1.1)
_MAX_SHEAR = 0.25
_MAX_SHIFT = 2.0  # pixels of the final image
_ELASTIC = 1.5  # std (canvas pixels) of the elastic displacement of each mesh node
_ELASTIC_GRID = 4  # mesh cells per side of the canvas


def _warps(rng: np.random.Generator, n: int, image_size: int) -> np.ndarray:
    """(n, 2, 3) random affine maps of the canvas about its centre (pixels): rotation, scale, aspect, shear, shift."""
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
    scale = rng.uniform(*_SCALE, n)
    aspect = np.exp(rng.uniform(-0.08, 0.08, n))
    shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR, n)
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, (n, 2)) * RENDER / image_size
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0], shr[:, 0, 1], shr[:, 1, 1] = aspect, shear, 1.0 / aspect
    return np.concatenate([scale[:, None, None] * rot @ shr, shift[:, :, None]], axis=2)


def _mesh_sources(glyph_sizes: np.ndarray, warps: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """(n, G+1, G+1, 2) glyph-side points of the canvas mesh nodes, G = `_ELASTIC_GRID`.

    Canvas node = canvas centre + shift + A (fit * (glyph point - glyph centre)), where `warps` holds
    (A | shift) and `jitter` (n, G+1, G+1, 2) displaces the nodes on the canvas: an elastic warp,
    bilinear inside each cell.
    """
    ticks = np.linspace(0.0, RENDER, _ELASTIC_GRID + 1)
    nodes = np.stack(np.meshgrid(ticks, ticks, indexing="xy"), -1)[None] + jitter - RENDER / 2.0
    nodes = nodes - warps[:, None, None, :, 2]
    inv = np.linalg.inv(warps[:, :, :2])
    fit = _FIT * RENDER / glyph_sizes.max(axis=1)
    src = np.einsum("nyxj,nij->nyxi", nodes, inv) / fit[:, None, None, None]
    return src + glyph_sizes[:, None, None, :] / 2.0


@functools.lru_cache(maxsize=None)
def _mesh_boxes() -> list[tuple[int, int, int, int]]:
    """Canvas cells of the mesh, row by row (the order of `_quads`)."""
    edges = np.round(np.linspace(0, RENDER, _ELASTIC_GRID + 1)).astype(int).tolist()
    cells = range(_ELASTIC_GRID)
    return [(edges[i], edges[j], edges[i + 1], edges[j + 1]) for j in cells for i in cells]


def _quads(src: np.ndarray) -> np.ndarray:
    """(n, G*G, 8) PIL quads (upper left, lower left, lower right, upper right) from mesh sources."""
    q = np.concatenate([src[:, :-1, :-1], src[:, 1:, :-1], src[:, 1:, 1:], src[:, :-1, 1:]], axis=-1)
    return q.reshape(len(src), -1, 8)


@functools.lru_cache(maxsize=None)
def _downsampler(size: int) -> np.ndarray:
    """(size, RENDER) antialiasing triangle filter: `D @ image @ D.T` shrinks a canvas to size x size."""
    scale = RENDER / size
    centre = (np.arange(size) + 0.5) * scale
    pos = np.arange(RENDER) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centre[:, None]) / max(scale, 1.0), 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _sample_glyph(ch: str, faces: tuple[str, ...], face: int, size: int, stroke: int) -> Image.Image | None:
    """The glyph in the drawn face, falling back to the first face (checked to have ink) if it is empty."""
    glyph = _glyph(ch, faces[face], size, stroke)
    return glyph if glyph is not None else _glyph(ch, faces[0], size, stroke)


def _render_class(
    cp: int, faces: tuple[str, ...], rng: np.random.Generator, samples: int, image_size: int
) -> np.ndarray:
    """`samples` varied drawings of character `cp`: uint8 (samples, image_size, image_size)."""
    face = rng.integers(len(faces), size=samples)
    size = rng.choice(_SIZES, size=samples)
    stroke = rng.choice(3, size=samples, p=[0.5, 0.3, 0.2])
    warps = _warps(rng, samples, image_size)
    jitter = rng.normal(0.0, _ELASTIC, (samples, _ELASTIC_GRID + 1, _ELASTIC_GRID + 1, 2))
    gamma = np.exp(rng.uniform(-0.3, 0.4, (samples, 1, 1))).astype(np.float32)
    peak = rng.uniform(0.7, 1.0, (samples, 1, 1))
    noise = rng.normal(0.0, 1.0, (samples, image_size, image_size)) * rng.uniform(0.0, 0.04, (samples, 1, 1))

    glyphs = [_sample_glyph(chr(cp), faces, int(f), int(z), int(w)) for f, z, w in zip(face, size, stroke)]
    dims = np.array([g.size if g is not None else (1, 1) for g in glyphs], dtype=np.float64)
    quads = _quads(_mesh_sources(dims, warps, jitter))
    boxes = _mesh_boxes()
    canvas = np.zeros((samples, RENDER, RENDER), np.float32)
    for k, glyph in enumerate(glyphs):
        if glyph is not None:
            mesh = list(zip(boxes, map(tuple, quads[k].tolist())))
            img = glyph.transform((RENDER, RENDER), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR)
            canvas[k] = np.asarray(img, np.float32)
    down = _downsampler(image_size)
    x = down @ (canvas / 255.0) ** gamma @ down.T
    return np.clip(np.rint((x * peak + noise) * 255.0), 0, 255).astype(np.uint8)


def split_ids(seed: int, num_classes: int) -> np.ndarray:
    """Class -> split index (0 train, 1 validation, 2 test): a seeded shuffle cut 64% / 16% / 20%."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_classes)
    n_test = round(0.20 * num_classes)
    n_val = round(0.16 * num_classes)
    out = np.zeros(num_classes, dtype=np.int8)
    out[order[:n_test]] = 2
    out[order[n_test : n_test + n_val]] = 1
    return out


def generate(
    seed: int = 0, samples: int = 20, image_size: int = 28, max_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the dataset: uint8 images (classes, samples, H, W), int code points, int8 split ids.

    Class `cp` draws from `default_rng([seed, cp])`, so a class's samples do not depend on the
    others. `max_classes` keeps that many classes spread over the scripts (for quick checks).
    """
    table = list(_class_table())
    if max_classes is not None:
        table = _spread(table, max_classes)
    images = np.stack(
        [_render_class(cp, faces, np.random.default_rng([seed, cp]), samples, image_size) for cp, faces in table]
    )
    codepoints = np.array([cp for cp, _ in table], dtype=np.int64)
    return images, codepoints, split_ids(seed, len(table))


# ----------------------------------------------------------------------------- cache


def cache_dir(root: str | Path | None = None) -> Path:
    """`root`, else `$MRML_CACHE`, else `$XDG_CACHE_HOME/mrml`, else `~/.cache/mrml`."""
    if root is not None:
        return Path(root)
    if os.environ.get("MRML_CACHE"):
        return Path(os.environ["MRML_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mrml"
    return Path.home() / ".cache" / "mrml"


def cache_path(seed: int, samples: int, image_size: int, root: str | Path | None = None) -> Path:
    return cache_dir(root) / f"glyphs-v{VERSION}-seed{seed}-n{samples}-s{image_size}.npz"


def _fingerprint() -> str:
    """What the generated arrays depend on besides the options: a cache made under another is stale."""
    import PIL

    recipe = (
        (_RANGES, _UNICODE_FACES, _TEX_FACES, RENDER, _FIT, _CANON, _MIN_INK, _DUP_DIST),
        (_SIZES, _MAX_ROTATION, _SCALE, _MAX_SHEAR, _MAX_SHIFT, _ELASTIC, _ELASTIC_GRID),
    )
    digest = hashlib.sha1(repr(recipe).encode()).hexdigest()[:12]
    return (
        f"glyphs-v{VERSION}-{digest} matplotlib-{matplotlib.__version__} pillow-{PIL.__version__}"
        f" unicode-{unicodedata.unidata_version}"
    )


def _warn_once(message: str) -> None:
    global _warned_cache
    if not _warned_cache:
        _warned_cache = True
        print(f"mrml: warning: {message}", file=sys.stderr)


def _load(path: Path, seed: int, samples: int, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable, stale or malformed."""
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            images, codepoints, splits = z["images"], z["codepoints"], z["split"]
            fingerprint = str(z["fingerprint"])
    except Exception:  # a truncated or foreign file: zip, zlib, format or key errors
        return None
    n = len(codepoints)
    ok = (
        fingerprint == _fingerprint()
        and images.dtype == np.uint8
        and images.shape == (n, samples, image_size, image_size)
        and codepoints.shape == (n,)
        and splits.shape == (n,)
        and n > 0
        and np.array_equal(splits, split_ids(seed, n))
    )
    return (images, codepoints.astype(np.int64), splits.astype(np.int8)) if ok else None


def _save(path: Path, images: np.ndarray, codepoints: np.ndarray, splits: np.ndarray) -> bool:
    """Write the cache atomically (temporary file in the same folder, then rename); warn once on failure."""
    arrays = {"images": images, "codepoints": codepoints, "split": splits, "fingerprint": np.array(_fingerprint())}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # a shared cache, readable like any file the user creates
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
        return True
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        _warn_once(f"cannot write the glyphs cache {path} ({e.strerror or e}); the images stay in memory only")
        return False


def load_or_generate(
    seed: int = 0, samples: int = 20, image_size: int = 28, root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path, bool]:
    """(images, code points, split ids, cache path, whether read from the cache)."""
    path = cache_path(seed, samples, image_size, root)
    cached = _load(path, seed, samples, image_size)
    if cached is not None:
        return (*cached, path, True)
    images, codepoints, splits = generate(seed, samples, image_size)
    _save(path, images, codepoints, splits)
    return images, codepoints, splits, path, False


# ----------------------------------------------------------------------------- builder

_IGNORED_OPTIONS = ()


def _check_int(name: str, value: Any, low: int, default: int, high: int = 2**32 - 1) -> int:
    """`value` as an int in `low..high` (None means `default`), else a UsageError naming the option."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise UsageError(f"glyphs option {name} must be an integer >= {low} and <= {high} (got {value!r})")
    return int(value)


@register("glyphs")
def build_glyphs(
    root: str | Path | None = None, seed: int = 0, samples: int = 20, image_size: int = 28,
    dataset_seed: int = 0, split_file: str | Path | None = None, **unused: Any
) -> FewShotDataset:
    """The embedded glyphs dataset; `root` is the cache folder (default: the user cache, see `cache_dir`).

    `dataset_seed` fixes the rendered images and the class split; `seed` is the run's seed, which the
    dataset does not use (so runs with different seeds share one dataset and one test split).
    `split_file`: a class split JSON, or `glyphs:scripts` (split by script family), instead of the
    seeded split (see `mrml.data.glyph_splits`); classes the file does not list are left out."""
    unknown = sorted(set(unused) - set(_IGNORED_OPTIONS))
    if unknown:
        raise UsageError(f"dataset 'glyphs' has no option {unknown[0]!r} "
                         "(it takes samples, image_size, dataset_seed, split_file)")
    seed = _check_int("dataset_seed", dataset_seed, 0, 0)
    samples = _check_int("samples", samples, 1, 20)
    image_size = _check_int("image_size", image_size, 8, 28, 128)  # rendered for every class: keep it small
    split = None
    if split_file is not None:
        split = read_split(split_file)  # checked before any drawing
    images, codepoints, splits, path, cached = load_or_generate(seed, samples, image_size, root)
    if split is not None:
        splits = file_split_ids(split, codepoints)
    parts = {}
    for sid, name in enumerate(SPLITS):
        idx = np.flatnonzero(splits == sid)
        names = [class_name(int(codepoints[i])) for i in idx]
        parts[name] = ArrayClassImages(names, [images[i] for i in idx], to_tensor)
    info = {
        "num_classes": len(codepoints),
        "classes": {name: parts[name].num_classes for name in SPLITS},
        "samples_per_class": samples,
        "image_size": image_size,
        "seed": seed,
        "split_file": None if split is None else str(split_file),
        "unused_classes": int((splits < 0).sum()),
        "cache": str(path),
        "from_cache": cached,
    }
    return FewShotDataset(name="glyphs", splits=parts, kind="classification", info=info)


def negative_tensor(batch: np.ndarray) -> torch.Tensor:
    """`to_tensor` of the negative image (255 - v): dark strokes on a light ground."""
    return to_tensor(255 - batch)


@register("glyphs-negative")
def build_glyphs_negative(root: str | Path | None = None, **options: Any) -> FewShotDataset:
    """`glyphs` drawn dark on light (every pixel 255 - v, as Omniglot's own images are): the same classes,
    samples, options and splits (`split_file` included), the opposite polarity. A domain shift for a run
    trained on `glyphs`: the same characters, every low-level statistic changed (README, cross-domain).

    Example:
        >>> a, b = build_glyphs(samples=2), build_glyphs_negative(samples=2)
        >>> x, y = a.splits["test"].images(0, np.arange(2)), b.splits["test"].images(0, np.arange(2))
        >>> bool(torch.allclose(x + y, torch.ones_like(x))), b.name, b.info["polarity"]
        (True, 'glyphs-negative', 'dark on light')
    """
    base = build_glyphs(root, **options)
    parts = {name: ArrayClassImages(part.names, part.arrays, negative_tensor) for name, part in base.splits.items()}
    return FewShotDataset(name="glyphs-negative", splits=parts, kind="classification",
                          info={**base.info, "polarity": "dark on light"})
