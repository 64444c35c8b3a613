"""Captioned shapes: small RGB images drawn in code, each with a one-line prompt.

Every image holds one object on a black background, described by four attributes::

    "a small red circle in the top left"
       size  colour shape     position

    colour    red, green, blue, yellow, magenta, cyan   (pure RGB primaries and secondaries)
    shape     circle, square, triangle
    size      small, large
    position  top left, top right, bottom left, bottom right, center

That is 6 x 3 x 2 x 5 = 180 combinations. The label of an image is the row
``(colour, shape, size, position)`` of indices into :data:`COLOURS`, :data:`SHAPES`,
:data:`SIZES` and :data:`POSITIONS` (:data:`LABEL_COLUMNS` names the columns).

Geometry (pixel units for the default 32 x 32; everything scales with ``image_size / 32``).
Pixel (i, j) covers [j, j+1] x [i, i+1], so its centre is (j + 0.5, i + 0.5); y points down.

* Position: the object's bounding-box centre sits at the centre of its quadrant,
  (8, 8), (24, 8), (8, 24), (24, 24), or at the image centre (16, 16), moved by a
  uniform jitter of up to +-1.5 pixels in x and in y.
* Size: the half-width ``r`` of the bounding box is 3.25 (small) or 5.5 (large),
  times a uniform factor in [0.9, 1.1]. A large object with the most jitter still
  ends 0.45 pixels inside its quadrant and the image.
* Shape, all inside the same 2r x 2r box: a circle of radius r, an axis-aligned
  square of half-side r, and an upward isosceles triangle with its apex at the
  middle of the top edge and its base along the bottom edge. Their areas are
  pi r^2, 4 r^2 and 2 r^2: area / box area is pi/4, 1 and 1/2, which is what
  :mod:`diffusion_np.metrics.shapes` reads the shape from.

Anti-aliasing: each shape has an exact signed distance function d(p) (negative
inside), and a pixel's coverage is clip(0.5 - d(centre), 0, 1): a pixel whose centre
lies on the boundary is half covered, one a pixel away from it inside is fully
covered. For a straight edge this equals the exact area of the pixel inside the
shape when the edge runs along a pixel axis, and is a close approximation otherwise.
The pixel value is ``coverage * colour`` over black, so every image uses only the
background, its own colour and blends of the two. Images are mapped from [0, 1] to
[-1, 1] (black is -1) as diffusion models expect.

Held-out combinations (compositional generalisation, as in GenEval-style evaluation):
for each of the 18 (colour, shape) pairs exactly one (size, position) is held out::

    size     = (colour + shape) % 2
    position = (2 * colour + shape) % 5

18 of 180 combinations (10%), listed in :data:`HELDOUT_COMBOS`. Every single
attribute value and every pair of attribute values still occurs in training: of
the combinations that share a pair of values, at most 1 of 10 (colour, shape),
2 of 15 (colour, size), 1 of 6 (colour, position), 3 of 30 (shape, size),
2 of 12 (shape, position) and 2 of 18 (size, position) are held out. So a model
has seen "small", "red", "circle" and "top left", and small red things, red
circles, circles in the top left and so on, but never "a small red circle in the
top left" itself. ``split="train"`` never draws these, ``split="heldout"`` draws
only these, ``split="all"`` draws all 180.

Sampling draws a combination uniformly from those of the split, then the jitter.

Free geometry and control images (for ControlNet, :mod:`diffusion_np.models.controlnet`):
:func:`sample_free_geometry` places the bounding box anywhere, at any half-width in
:data:`FREE_RADIUS` (2.5 to 8 pixels at 32 x 32, well beyond the two named sizes and five
named positions), :func:`render_at` draws a shape there with the same signed distance
functions, and :func:`control_images` turns the same geometry into a control image, one
channel in [0, 1]:

* ``"mask"``: the coverage itself, white inside the shape (anti-aliased, as the image);
* ``"edges"``: the outline, ``clip(1 - |d|, 0, 1)``: 1 on the boundary, 0 from one pixel away.

The caption of such an image names the nearest size and position (:func:`nearest_labels`);
only the control image says where exactly the shape is and how large.
:class:`ControlShapesDataset` draws (image, caption, control image) triples this way.

New concepts for personalisation (:mod:`diffusion_np.training.personalise`): one shape and one
colour that ``pretrained:shapes`` never saw, appended after the base's values so every base
label keeps its index::

    shape 3   star      a five-pointed star, point up, in the same 2r x 2r box
    colour 6  orange    RGB (1, 0.5, 0), half-way between red and yellow

:data:`CONCEPT_SHAPES` and :data:`CONCEPT_COLOURS` are the base tuples with them added;
:func:`render`, :func:`caption` and :func:`parse_caption` accept them, the 180 base
combinations (:func:`combos`) and the datasets above never draw them.
:func:`concept_split` says which combinations of a concept are shown in fine-tuning and
which are kept back to measure whether the concept composes with the rest.

How captions name a new concept. The shipped model's tokenizer is a word tokenizer (one id
per word, :mod:`diffusion_np.models.tokenizer`): an unknown word such as "star" or "sks"
becomes ``<unk>``, the same id for every unknown word and never seen in training. So a
placeholder token like DreamBooth's "sks" would buy nothing here (it is not a rare *existing*
token as it is for CLIP's BPE, just ``<unk>``), and two concepts would share it. Instead the
concept's own word is added to the vocabulary as a new id
(:func:`diffusion_np.training.personalise.add_concept_token`), with a new row in the text
encoder's token table; the captions then read naturally, "a small red star in the top left",
and the analyser parses them. What the new row starts as and whether it is trained is the
difference between the methods: textual inversion trains that row alone; LoRA and DreamBooth
keep it at its initial value and train the U-Net. (For CLIP's byte-level BPE the same step is
``tokenizer.add_tokens(["<star>"])`` and a resized token table, as diffusers'
textual-inversion script does.)

Left out on purpose: several objects per image, rotation, textures, and any
background other than black (black keeps the "is this pixel the object?" question
of the analyser trivial).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from diffusion_np.backend import asnumpy

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

#: names of the four label columns, in order
LABEL_COLUMNS = ("colour", "shape", "size", "position")

#: the concepts ``pretrained:shapes`` never saw (module docstring), appended after the base values
NEW_COLOURS = ("orange",)
NEW_SHAPES = ("star",)
#: every colour and shape :func:`render` and :func:`caption` know: the base's, then the new ones
CONCEPT_COLOURS = COLOURS + NEW_COLOURS
CONCEPT_SHAPES = SHAPES + NEW_SHAPES

#: the RGB value in [0, 1] of each colour of :data:`CONCEPT_COLOURS` (7, 3): the six of
#: :data:`COLOURS`, then orange
COLOUR_RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0]],
                      dtype=np.float32)
#: inner radius / outer radius of the star: 0.5, fatter than the regular pentagram's 0.382, so
#: a small star (about 7 pixels across) still shows its five points at 32 x 32
STAR_INNER = 0.5

#: half-width of the bounding box of each size of :data:`SIZES`, in pixels of a 32 x 32 image
SIZE_RADIUS = (3.25, 5.5)
#: the size factor is uniform in [1 - SIZE_JITTER, 1 + SIZE_JITTER]
SIZE_JITTER = 0.1
#: the position is moved by a uniform offset in [-POSITION_JITTER, POSITION_JITTER] pixels, in x and in y
POSITION_JITTER = 1.5
#: bounding-box centre (x, y) of each position of :data:`POSITIONS`, in pixels of a 32 x 32 image
POSITION_XY = np.array([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0], [24.0, 24.0], [16.0, 16.0]])
#: half-width range (pixels at 32 x 32) of the free geometry of control images: from below the small
#: size (3.25 +- 10%) to about 1.5 times the large one (5.5 +- 10%)
FREE_RADIUS = (2.5, 8.0)
#: the bounding box of a free shape stays this many pixels (at 32 x 32) inside the image
FREE_MARGIN = 1.0
#: the kinds of control image :func:`control_images` draws
CONTROL_KINDS = ("mask", "edges")

SPLITS = ("train", "heldout", "all")

_SHAPE_OF_LABELS = (len(COLOURS), len(SHAPES), len(SIZES), len(POSITIONS))  # (6, 3, 2, 5)
_CONCEPT_LABELS = (len(CONCEPT_COLOURS), len(CONCEPT_SHAPES), len(SIZES), len(POSITIONS))  # (7, 4, 2, 5)


def _all_combos() -> np.ndarray:
    """Every (colour, shape, size, position) row, (180, 4) int64, in C order."""
    grids = np.meshgrid(*[np.arange(k) for k in _SHAPE_OF_LABELS], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1).astype(np.int64)


def _heldout_combos() -> np.ndarray:
    """One (size, position) per (colour, shape) pair; the rule is in the module docstring."""
    colour, shape = np.meshgrid(np.arange(len(COLOURS)), np.arange(len(SHAPES)), indexing="ij")
    colour, shape = colour.ravel(), shape.ravel()
    size = (colour + shape) % len(SIZES)
    position = (2 * colour + shape) % len(POSITIONS)
    return np.stack([colour, shape, size, position], axis=1).astype(np.int64)


#: the 18 held-out (colour, shape, size, position) rows (18, 4)
HELDOUT_COMBOS = _heldout_combos()


def _combo_index(labels: np.ndarray) -> np.ndarray:
    """Row (c, s, z, p) -> its flat index c*30 + s*10 + z*5 + p in 0..179."""
    return np.ravel_multi_index(tuple(np.asarray(labels).T), _SHAPE_OF_LABELS)


def is_heldout(labels) -> np.ndarray:
    """Boolean (B,) (or a scalar for one row): is each label row a held-out combination?
    (Rows with a new concept, :data:`NEW_COLOURS` / :data:`NEW_SHAPES`, are not among the 180: False.)"""
    labels = np.asarray(labels)
    rows = labels.reshape(-1, 4)
    base = (rows < np.array(_SHAPE_OF_LABELS)).all(axis=1)  # (B,) a base combination
    heldout = np.zeros(int(np.prod(_SHAPE_OF_LABELS)), dtype=bool)
    heldout[_combo_index(HELDOUT_COMBOS)] = True
    out = np.zeros(len(rows), dtype=bool)
    out[base] = heldout[_combo_index(rows[base])] if base.any() else []
    return out.reshape(labels.shape[:-1])


def combos(split: str = "all") -> np.ndarray:
    """All label rows of a split, (N, 4) int64: 162 for "train", 18 for "heldout", 180 for "all"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = _all_combos()
    if split == "all":
        return rows
    held = is_heldout(rows)
    return rows[held] if split == "heldout" else rows[~held]


# ----------------------------------------------------------------------------- captions


def _check_labels(labels) -> np.ndarray:
    """Labels as an integer array (4,) or (B, 4) with every column in range, or a clear error."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[-1] != 4:
        raise ValueError(f"labels must be (4,) or (B, 4) (colour, shape, size, position), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    high = np.array(_CONCEPT_LABELS)  # the base values and the new concepts
    if np.any(labels < 0) or np.any(labels >= high):
        raise ValueError(f"labels out of range: column j must lie in [0, {list(high)}[j]), got {labels.tolist()}")
    return labels


def caption(labels) -> str | list[str]:
    """The prompt of one label row (4,) -> str, or of a batch (B, 4) -> list of str.

    >>> caption([0, 0, 0, 0])
    'a small red circle in the top left'
    """
    labels = _check_labels(labels)
    rows = [
        f"a {SIZES[z]} {CONCEPT_COLOURS[c]} {CONCEPT_SHAPES[s]} in the {POSITIONS[p]}"
        for c, s, z, p in labels.reshape(-1, 4).tolist()
    ]
    return rows[0] if labels.ndim == 1 else rows


_FILLER = {"a", "an", "in", "the", "at", "on"}
_WORD = re.compile(r"[a-z]+")


def _parse_one(text: str) -> list[int]:
    words = _WORD.findall(text.lower())
    found: dict[str, list[int]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in _FILLER:
            pass
        elif word in CONCEPT_COLOURS:
            found.setdefault("colour", []).append(CONCEPT_COLOURS.index(word))
        elif word in CONCEPT_SHAPES:
            found.setdefault("shape", []).append(CONCEPT_SHAPES.index(word))
        elif word in SIZES:
            found.setdefault("size", []).append(SIZES.index(word))
        elif word in ("center", "centre"):  # both spellings mean the same place
            found.setdefault("position", []).append(POSITIONS.index("center"))
        elif word in ("top", "bottom"):
            if i + 1 >= len(words) or words[i + 1] not in ("left", "right"):
                raise ValueError(f"in caption {text!r}: {word!r} must be followed by 'left' or 'right'")
            found.setdefault("position", []).append(POSITIONS.index(f"{word} {words[i + 1]}"))
            i += 1
        else:
            raise ValueError(
                f"unknown word {word!r} in caption {text!r}; known words: colours {CONCEPT_COLOURS}, "
                f"shapes {CONCEPT_SHAPES}, "
                f"sizes {SIZES}, positions {POSITIONS}, and {sorted(_FILLER)}"
            )
        i += 1
    row = []
    for column in LABEL_COLUMNS:
        values = found.get(column, [])
        if len(values) != 1:
            what = "no" if not values else "more than one"
            raise ValueError(f"caption {text!r} has {what} {column}; it needs exactly one")
        row.append(values[0])
    return row


def parse_caption(text: str | Sequence[str]) -> np.ndarray:
    """Labels from captions: a str -> (4,) int64, a list of str -> (B, 4) int64.

    Case and punctuation are ignored, as are the words a, an, in, the, at, on, and
    the order of the attributes; "centre" is read as "center". Every caption must
    name exactly one colour, shape, size and position. Unknown words raise a
    ValueError that names them.
    """
    if isinstance(text, str):
        return np.array(_parse_one(text), dtype=np.int64)
    rows = [_parse_one(t) for t in text]
    return np.array(rows, dtype=np.int64).reshape(len(rows), 4)


def all_prompts(split: str = "all") -> list[str]:
    """The caption of every combination of a split (162 "train", 18 "heldout", 180 "all")."""
    return caption(combos(split))


# ----------------------------------------------------------------------------- new concepts
#: the new concepts, by name: (label column, index in CONCEPT_COLOURS / CONCEPT_SHAPES)
CONCEPTS = {"star": ("shape", CONCEPT_SHAPES.index("star")), "orange": ("colour", CONCEPT_COLOURS.index("orange"))}

# the 8 combinations each concept is shown in when fine-tuning, as rows of the other three attributes:
# for the star (colour, size, position), for orange (shape, size, position). Every value of each
# attribute appears (all six colours or all three shapes, both sizes, all five positions), but each only in
# some combinations, as the base data's held-out split does: what is left is the concept composed with
# values it was shown beside others, never beside these.
_SHOWN_SIZE_POSITION = np.array([[0, 0], [1, 4], [1, 1], [0, 3], [0, 2], [1, 0], [1, 3], [0, 4]])  # (8, 2): both
#: the first column of each concept's 8 rows: the star's colours, orange's shapes
_SHOWN_FIRST = {"star": np.array([0, 1, 2, 3, 4, 5, 0, 2]),  # red, green, blue, yellow, magenta, cyan, red, blue
                "orange": np.array([0, 0, 1, 1, 2, 2, 0, 1])}  # circle, circle, square, square, triangle, ...


def concept_split(concept: str) -> tuple[np.ndarray, np.ndarray]:
    """``(shown (8, 4), unseen (N, 4))``: the label rows of a new concept used for fine-tuning,
    and those never shown with it (kept back to measure whether it composes).

    ``"star"``: the star at the 8 (colour, size, position) rows above, every colour among them;
    unseen are the other 52 star combinations with a base colour. ``"orange"``: orange circles,
    squares and triangles at 8 rows; unseen the other 22 orange combinations with a base shape.
    (An orange star, both new at once, is in neither.)
    """
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {tuple(CONCEPTS)}, got {concept!r}")
    column, value = CONCEPTS[concept]
    first, (size, position) = _SHOWN_FIRST[concept], _SHOWN_SIZE_POSITION.T
    if column == "shape":
        shown = np.stack([first, np.full(8, value), size, position], axis=1)
        grids = np.meshgrid(np.arange(len(COLOURS)), [value], np.arange(len(SIZES)), np.arange(len(POSITIONS)),
                            indexing="ij")
    else:
        shown = np.stack([np.full(8, value), first, size, position], axis=1)
        grids = np.meshgrid([value], np.arange(len(SHAPES)), np.arange(len(SIZES)), np.arange(len(POSITIONS)),
                            indexing="ij")
    every = np.stack([g.ravel() for g in grids], axis=1)
    seen = {tuple(row) for row in shown.tolist()}
    unseen = np.array([row for row in every.tolist() if tuple(row) not in seen])
    return shown.astype(np.int64), unseen.astype(np.int64)


def concept_images(concept: str, n: int = 8, seed: int = 0, image_size: int = 32):
    """The fine-tuning images of a concept: ``(images (n, S, S, 3), captions, labels (n, 4))``, the
    shown rows of :func:`concept_split` in turn (``n`` from 4 to 16: a row may repeat with new jitter)."""
    if not isinstance(n, (int, np.integer)) or not 4 <= n <= 16:
        raise ValueError(f"n must be an integer from 4 to 16 (a few images of the concept), got {n!r}")
    shown, _ = concept_split(concept)
    labels = shown[np.arange(n) % len(shown)]
    return render(labels, seed, image_size), caption(labels), labels


# ----------------------------------------------------------------------------- drawing


def _sdf_circle(x, y, cx, cy, r):
    """Signed distance to a circle: |p - c| - r."""
    return np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r


def _sdf_square(x, y, cx, cy, r):
    """Signed distance to an axis-aligned square of half-side r (the exact box SDF).

    q = |p - c| - r per axis; outside: |max(q, 0)|, inside: max(qx, qy) (<= 0).
    """
    qx = np.abs(x - cx) - r
    qy = np.abs(y - cy) - r
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _sdf_triangle(x, y, cx, cy, r):
    """Signed distance to the upward triangle with apex (cx, cy - r), base y = cy + r, x in cx +- r.

    The distance to the boundary is the smallest distance to its three edge
    segments; the sign comes from the inside test (below the two slanted edges,
    above the base): the half-width at height y is (y - (cy - r)) / 2.
    """
    ax, ay = cx, cy - r  # apex
    bx, by = cx - r, cy + r  # bottom left
    qx, qy = cx + r, cy + r  # bottom right
    dist = np.minimum(
        np.minimum(_segment_distance(x, y, ax, ay, bx, by), _segment_distance(x, y, bx, by, qx, qy)),
        _segment_distance(x, y, qx, qy, ax, ay),
    )
    inside = (y <= cy + r) & (np.abs(x - cx) <= (y - ay) / 2)
    return np.where(inside, -dist, dist)


def _segment_distance(x, y, ax, ay, bx, by):
    """Distance from points (x, y) to the segment from a to b: project, clamp to [0, 1], measure."""
    ex, ey = bx - ax, by - ay
    t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.sqrt((x - ax - t * ex) ** 2 + (y - ay - t * ey) ** 2)


def star_vertices(cx, cy, r):
    """The 10 vertices (x, y) of the star in the 2r x 2r box centred at (cx, cy): arrays (..., 10).

    Outer radius R = r / sin(72 deg), so the two side points touch the box's sides (the star is
    2 R sin 72 = 2r wide and R (1 + cos 36) = 1.90 r high); its centre sits R (1 - cos 36) / 2 = 0.1 r below
    the box's centre so that it spans the box's height symmetrically. Vertex k lies at angle
    90 + 36 k degrees (y up), on R for even k, on :data:`STAR_INNER` * R for odd k.
    """
    R = r / np.sin(np.deg2rad(72.0))
    star_cy = cy + R * (1 - np.cos(np.deg2rad(36.0))) / 2  # top at star_cy - R, bottom at star_cy + R cos 36
    k = np.arange(10)
    angle = np.deg2rad(90.0 + 36.0 * k)  # (10,)
    radius = np.where(k % 2 == 0, 1.0, STAR_INNER)  # (10,)
    R = np.asarray(R)[..., None]
    xs = np.asarray(cx)[..., None] + R * radius * np.cos(angle)
    ys = np.asarray(star_cy)[..., None] - R * radius * np.sin(angle)  # y points down
    return xs, ys


def _sdf_star(x, y, cx, cy, r):
    """Signed distance to the five-pointed star of :func:`star_vertices` (a 10-sided polygon).

    The distance is the smallest distance to the 10 edge segments; the sign comes from the
    even-odd crossing test (a horizontal ray to the right crosses the boundary an odd number
    of times from inside).
    """
    vx, vy = star_vertices(cx, cy, r)  # (B, 1, 1, 10) each, for (B, 1, 1) centres
    dist = np.inf
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(cx)), dtype=bool)
    for k in range(10):
        ax, ay, bx, by = vx[..., k], vy[..., k], vx[..., (k + 1) % 10], vy[..., (k + 1) % 10]
        dist = np.minimum(dist, _segment_distance(x, y, ax, ay, bx, by))
        straddles = (ay > y) != (by > y)  # the edge spans the pixel's height
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= straddles & (x < x_cross)
    return np.where(inside, -dist, dist)


_SDF = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_star)  # in the order of CONCEPT_SHAPES


def render(labels, rng: np.random.Generator | int | None = None, image_size: int = 32) -> np.ndarray:
    """Draw the images of label rows (B, 4): float32 (B, image_size, image_size, 3) in [-1, 1].

    The jitter of position and size comes from ``rng`` (a Generator, or a seed);
    the whole batch is drawn at once with broadcasting, one shape kind at a time.
    """
    labels = _check_labels(labels).reshape(-1, 4)
    rng = np.random.default_rng(rng)
    B, S = labels.shape[0], int(image_size)
    scale = S / 32.0
    colour, shape, size, position = labels.T

    # 1. the bounding-box centre (B,) and half-width (B,), with jitter; host float64 geometry
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=(B, 2))
    centre = (POSITION_XY[position] + jitter) * scale  # (B, 2) as (x, y)
    radius = np.array(SIZE_RADIUS)[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, size=B) * scale
    return _paint(_signed_distance(shape, centre, radius, S), colour)


def _signed_distance(shape, centre, radius, S: int) -> np.ndarray:
    """Steps 2-3 of drawing: the signed distance (B, S, S) of every pixel centre to its image's shape."""
    # 2. pixel centres, broadcast against the batch: (1, 1, S) and (1, S, 1)
    xs = (np.arange(S) + 0.5)[None, None, :]
    ys = (np.arange(S) + 0.5)[None, :, None]
    cx, cy, r = centre[:, 0, None, None], centre[:, 1, None, None], radius[:, None, None]  # (B, 1, 1)

    # 3. signed distance of every pixel centre to its image's shape (B, S, S), one kind of shape at a time
    sdf = np.empty((len(shape), S, S))
    for k, sdf_fn in enumerate(_SDF):
        pick = shape == k
        sdf[pick] = sdf_fn(xs, ys, cx[pick], cy[pick], r[pick])
    return sdf


def _coverage(sdf) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32): half covered on the boundary, linear over one pixel."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _paint(sdf, colour) -> np.ndarray:
    """Steps 4-5 of drawing: coverage times the colour over black, then [0, 1] -> [-1, 1]."""
    coverage = _coverage(sdf)  # (B, S, S)
    rgb = coverage[..., None] * COLOUR_RGB[colour][:, None, None, :]  # (B, S, S, 1) * (B, 1, 1, 3)
    return rgb * 2.0 - 1.0


# ----------------------------------------------------------------------------- free geometry and control images


def sample_free_geometry(n: int, rng: np.random.Generator | int | None = None, image_size: int = 32):
    """``n`` bounding boxes anywhere in the image: (centre (n, 2) as (x, y), half-width (n,)), in pixels.

    The half-width is uniform in :data:`FREE_RADIUS`; the centre uniform over the places where
    the whole box stays :data:`FREE_MARGIN` pixels inside the image (all scaled by ``image_size / 32``).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(rng)
    scale = image_size / 32.0
    radius = rng.uniform(*FREE_RADIUS, size=n) * scale  # (n,)
    low = radius + FREE_MARGIN * scale  # (n,): the nearest the centre may come to the border
    centre = low[:, None] + rng.random((n, 2)) * (image_size - 2 * low)[:, None]  # (n, 2)
    return centre, radius


def _check_geometry(colour_shape, centre, radius) -> tuple:
    colour_shape = np.asarray(colour_shape)
    if colour_shape.ndim != 2 or colour_shape.shape[1] != 2 or not np.issubdtype(colour_shape.dtype, np.integer):
        raise ValueError(f"colour_shape must be integer (B, 2) rows (colour, shape), got {colour_shape.shape}")
    if colour_shape.min() < 0 or (colour_shape >= np.array([len(COLOURS), len(SHAPES)])).any():
        raise ValueError(f"colour_shape out of range: colours 0..{len(COLOURS) - 1}, shapes 0..{len(SHAPES) - 1}")
    centre, radius = np.asarray(centre, dtype=np.float64), np.asarray(radius, dtype=np.float64)
    B = len(colour_shape)
    if centre.shape != (B, 2) or radius.shape != (B,):
        raise ValueError(f"centre must be ({B}, 2) and radius ({B},) for {B} shapes, got {centre.shape} and "
                         f"{radius.shape}")
    if not (radius > 0).all():
        raise ValueError("radius must be > 0")
    return colour_shape, centre, radius


def render_at(colour_shape, centre, radius, image_size: int = 32) -> np.ndarray:
    """Draw shapes of (colour, shape) rows (B, 2) with their bounding box at ``centre`` (B, 2) (x, y) and
    half-width ``radius`` (B,), in pixels: float32 (B, image_size, image_size, 3) in [-1, 1], as :func:`render`."""
    colour_shape, centre, radius = _check_geometry(colour_shape, centre, radius)
    return _paint(_signed_distance(colour_shape[:, 1], centre, radius, int(image_size)), colour_shape[:, 0])


def control_images(shape, centre, radius, kind: str = "mask", image_size: int = 32) -> np.ndarray:
    """The control image of shapes (B,) (indices into :data:`SHAPES`) at ``centre``, ``radius``:
    float32 (B, image_size, image_size, 1) in [0, 1], a ``"mask"`` (the coverage) or ``"edges"``
    (the outline), see the module docstring."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"kind must be one of {CONTROL_KINDS}, got {kind!r}")
    shape = np.asarray(shape)
    _, centre, radius = _check_geometry(np.stack([np.zeros_like(shape), shape], axis=1), centre, radius)
    sdf = _signed_distance(shape, centre, radius, int(image_size))  # (B, S, S)
    image = _coverage(sdf) if kind == "mask" else np.clip(1.0 - np.abs(sdf), 0.0, 1.0).astype(np.float32)
    return image[..., None]  # (B, S, S, 1): one channel


def nearest_labels(colour_shape, centre, radius, image_size: int = 32) -> np.ndarray:
    """(B, 4) label rows for free geometry: the colour and shape given, the named size and position
    nearest to ``radius`` and ``centre`` (sizes split half-way between the two radii)."""
    colour_shape, centre, radius = _check_geometry(colour_shape, centre, radius)
    scale = image_size / 32.0
    size = (radius / scale > sum(SIZE_RADIUS) / 2).astype(np.int64)  # (B,)
    distance = np.linalg.norm(centre[:, None, :] / scale - POSITION_XY[None], axis=2)  # (B, 5)
    return np.concatenate([colour_shape, size[:, None], distance.argmin(axis=1)[:, None]], axis=1).astype(np.int64)


class ControlShapesDataset:
    """(image, caption, control image) triples with free geometry: training data for a ControlNet.

    Each draw: a (colour, shape) pair uniformly from the 18, a bounding box from
    :func:`sample_free_geometry`, the image from :func:`render_at`, the control image of
    ``kind`` from :func:`control_images`, and the caption of :func:`nearest_labels`.

    ``sample(n, rng=None) -> (images (n, S, S, 3) in [-1, 1], captions, labels (n, 4),
    controls (n, S, S, 1) in [0, 1])``; with no ``rng`` the dataset's own generator (``seed``) moves on.
    :meth:`sample_geometry` draws the same geometry without drawing anything.
    """

    def __init__(self, kind: str = "mask", seed: int = 0, image_size: int = 32):
        if kind not in CONTROL_KINDS:
            raise ValueError(f"kind must be one of {CONTROL_KINDS}, got {kind!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        self.kind, self.image_size = kind, int(image_size)
        self._rng = np.random.default_rng(seed)

    def sample_geometry(self, n: int, rng: np.random.Generator | int | None = None):
        """``n`` draws of (colour_shape (n, 2), centre (n, 2), radius (n,)): what :meth:`sample` draws."""
        rng = self._rng if rng is None else np.random.default_rng(rng)
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        colour_shape = np.stack([rng.integers(0, len(COLOURS), n), rng.integers(0, len(SHAPES), n)], axis=1)
        centre, radius = sample_free_geometry(n, rng, self.image_size)
        return colour_shape, centre, radius

    def sample(self, n: int, rng: np.random.Generator | int | None = None):
        colour_shape, centre, radius = self.sample_geometry(n, rng)
        images = render_at(colour_shape, centre, radius, self.image_size)
        controls = control_images(colour_shape[:, 1], centre, radius, self.kind, self.image_size)
        labels = nearest_labels(colour_shape, centre, radius, self.image_size)
        return images, caption(labels), labels, controls


class ShapesDataset:
    """An endless, seeded stream of captioned shape images (see the module docstring).

    Parameters
    ----------
    split : {"train", "heldout", "all"}
        Which combinations are drawn; "train" never draws :data:`HELDOUT_COMBOS`.
    seed : int
        Seed of the dataset's own generator, used when ``sample`` gets no ``rng``.
        Two datasets with the same seed give the same sequence of batches.
    image_size : int
        Side of the square images; the geometry scales with ``image_size / 32``.

    Examples
    --------
    >>> images, captions, labels = ShapesDataset("train", seed=0).sample(16)
    >>> images.shape, images.dtype, labels.shape
    ((16, 32, 32, 3), dtype('float32'), (16, 4))
    """

    COLOURS, SHAPES, SIZES, POSITIONS = COLOURS, SHAPES, SIZES, POSITIONS

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 32):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        self.split = split
        self.image_size = int(image_size)
        self.combos = combos(split)  # (N, 4) the label rows this split draws from
        self._rng = np.random.default_rng(seed)

    def sample(self, n: int, rng: np.random.Generator | int | None = None):
        """Draw ``n`` images.

        Parameters
        ----------
        n : int
            Batch size.
        rng : Generator or int, optional
            Generator (or seed) to draw from; by default the dataset's own, which
            moves on with each call.

        Returns
        -------
        images : float32 (n, image_size, image_size, 3) in [-1, 1], black background at -1
        captions : list of n str, e.g. "a small red circle in the top left"
        labels : int64 (n, 4), columns (colour, shape, size, position)
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = self._rng if rng is None else np.random.default_rng(rng)
        labels = self.combos[rng.integers(0, len(self.combos), size=n)]  # (n, 4) uniform over combinations
        images = render(labels, rng, self.image_size)
        return images, caption(labels), labels

    # the caption helpers, reachable from an instance too
    caption = staticmethod(caption)
    parse_caption = staticmethod(parse_caption)
    all_prompts = staticmethod(all_prompts)


def plot_shapes_grid(images, captions: Sequence[str] | None = None, ncols: int = 8, size: float = 1.6):
    """A matplotlib figure showing images in a grid, each titled with its caption.

    ``images`` is (B, H, W, 3) or (B, H, W, 1) in [-1, 1] (NumPy or CuPy); one
    channel is shown in grey. Long captions are wrapped onto two lines. Returns the
    figure (call ``plt.close(fig)`` when done with it in a loop).
    """
    import matplotlib.pyplot as plt  # imported here: only plotting needs it

    images = asnumpy(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, 3) or (B, H, W, 1), got {images.shape}")
    B = images.shape[0]
    if captions is not None and len(captions) != B:
        raise ValueError(f"got {B} images but {len(captions)} captions")
    ncols = max(1, min(ncols, B))
    nrows = -(-B // ncols)  # ceil
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.25), squeeze=False)
    shown = np.clip((images + 1.0) / 2.0, 0.0, 1.0)  # [-1, 1] -> [0, 1] for imshow
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= B:
            continue
        if shown.shape[-1] == 1:
            ax.imshow(shown[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(shown[i], interpolation="nearest")
        if captions is not None:
            words = captions[i].split()
            half = (len(words) + 1) // 2
            ax.set_title(" ".join(words[:half]) + "\n" + " ".join(words[half:]), fontsize=7)
    fig.tight_layout()
    return fig
