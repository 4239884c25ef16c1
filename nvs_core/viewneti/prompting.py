"""ViewNeTI inference without a host: prompt templates, view tokens for a camera batch, bounded contexts.

What the ComfyUI "Apply" node (and any other front end) needs besides the mappers and the text encoder:

- **Prompt templates** with ``{view}`` and ``{object}`` fields, e.g. ``"{view}. A photo of a {object}"``
  (upstream's caption) or ``"{view}. A photo of a red car"`` (view control of a free prompt). The
  fields become placeholder tokens as upstream's ``tokenizer.add_tokens`` makes them: the text between
  them is tokenized piece by piece (an added token splits the text the same way), and each placeholder
  takes one token slot. Their embedding rows are replaced by the mapper outputs, so any id that appears
  nowhere else in the prompt serves (we take unused ids from the top of the vocabulary).
- **View tokens for cameras**: DTU calibration cameras by index, ``NVS_CAMERA`` batches placed in the
  DTU scene (either already in its coordinates or as an orbit around the middle of the DTU rig), or
  spherical tokens for mappers trained on (theta, phi) views. Every camera is checked against the range
  the mapper was trained on.
- **Contexts with a memory budget**: :class:`BoundedViewNetiContexts` precomputes the (keys, values)
  contexts for as many steps of a schedule as fit in a byte budget and computes the rest when sampling
  reaches them, dropping the oldest steps, so memory stays bounded for long schedules and camera batches.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cameras import Cameras
from .camera_tokens import (DTU_PROJECTION_ENTRIES, DTUCalibration, DTUCameraRange, SphericalViewRange,
                            dtu_scene_center, dtu_view_tokens_for_cameras, format_spherical_view_token,
                            spherical_view_from_cameras)
from .injection import ViewNetiContexts
from .loading import ViewNetiModel

FIELDS = ("view", "object")
DEFAULT_TEMPLATE = "{view}. A photo of a {object}"
# The words the placeholders were initialised from (their "super-categories"); a plain-text stand-in.
SUPER_CATEGORY_WORDS = {"view": "view", "object": "object"}
DEFAULT_MAX_EXTRAPOLATION = 2.0
_FIELD_RE = re.compile(r"\{([^{}]*)\}")

Tokenize = Callable[[Sequence[str]], torch.Tensor]


# ------------------------------------------------------------------------------------ templates

@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with ``{view}`` / ``{object}`` fields: ``segments`` are the texts around ``fields``."""

    text: str
    segments: Tuple[str, ...]
    fields: Tuple[str, ...]

    @classmethod
    def parse(cls, text: str, name: str = "prompt_template") -> "PromptTemplate":
        if not isinstance(text, str):
            raise ValueError(f"{name}: expected text, got {type(text).__name__}")
        segments, fields, start = [], [], 0
        for match in _FIELD_RE.finditer(text):
            field_name = match.group(1).strip()
            if field_name not in FIELDS:
                raise ValueError(f"{name}: unknown field {match.group(0)!r}; the template may use {{view}} and "
                                 "{object} only")
            if field_name in fields:
                raise ValueError(f"{name}: {{{field_name}}} appears more than once; each field may appear once")
            segments.append(text[start:match.start()])
            fields.append(field_name)
            start = match.end()
        segments.append(text[start:])
        if any("{" in s or "}" in s for s in segments):
            raise ValueError(f"{name}: unmatched brace in {text!r}; write fields as {{view}} and {{object}}")
        return cls(text, tuple(segments), tuple(fields))

    def has(self, field_name: str) -> bool:
        return field_name in self.fields

    def plain_text(self, words: Optional[Dict[str, str]] = None) -> str:
        """The template with each field replaced by a word (default: its super-category word)."""
        words = dict(SUPER_CATEGORY_WORDS, **(words or {}))
        out = self.segments[0]
        for field_name, segment in zip(self.fields, self.segments[1:]):
            out += words[field_name] + segment
        return out


def check_template_fields(template: PromptTemplate, has_view_mapper: bool, has_object_mapper: bool,
                          name: str = "prompt_template") -> None:
    """The fields must match the mappers: {view} is required with a view mapper, {object} needs one."""
    if has_view_mapper and not template.has("view"):
        raise ValueError(f"{name}: the template has no {{view}} field, so the view mapper would have no effect; "
                         f"write where the view token goes, e.g. {DEFAULT_TEMPLATE!r}")
    if not has_view_mapper and template.has("view"):
        raise ValueError(f"{name}: the template uses {{view}} but no view mapper is loaded; load a view mapper "
                         "file or remove {view}")
    if template.has("object") and not has_object_mapper:
        raise ValueError(f"{name}: the template uses {{object}} but no object mapper is loaded; load an object "
                         "mapper file (mapper-steps-N_object.pt) or write the object in words, e.g. "
                         "'{view}. A photo of a red car'")
    if not template.fields:
        raise ValueError(f"{name}: the template has neither {{view}} nor {{object}}; nothing would be learned")


@dataclass
class TokenizedTemplate:
    input_ids: torch.Tensor          # (1, T)
    token_ids: Dict[str, int]        # field -> placeholder id
    positions: Dict[str, int]        # field -> position in the row
    length: int                      # tokens used, start and end included


def _special_ids(tokenize: Tokenize) -> Tuple[int, int, int, int]:
    row = tokenize([""])[0].tolist()
    if len(row) < 3:
        raise ValueError(f"the tokenizer gives rows of {len(row)} tokens; expected start, end and padding")
    return row[0], row[1], row[2], len(row)


def _inner_tokens(tokenize: Tokenize, text: str, start: int, end: int) -> List[int]:
    if not text.strip():
        return []
    row = tokenize([text])[0].tolist()
    if row[0] != start:
        raise ValueError(f"the tokenizer does not start rows with its start token {start}")
    stop = row.index(end, 1) if end in row[1:] else len(row)
    return row[1:stop]


def tokenize_template(template: PromptTemplate, tokenize: Tokenize, vocab_size: int,
                      name: str = "prompt_template") -> TokenizedTemplate:
    """Token ids of a template, each field one placeholder token (see module doc).

    ``tokenize(texts)`` gives (B, T) rows [start, tokens..., end, padding...] (the model's tokenizer).
    A template longer than one row (T - 2 text tokens) is refused rather than cut.
    """
    start, end, pad, length = _special_ids(tokenize)
    pieces = [_inner_tokens(tokenize, s, start, end) for s in template.segments]
    used = {start, end, pad}.union(*map(set, pieces))
    free = (i for i in range(int(vocab_size) - 1, -1, -1) if i not in used)
    token_ids = {f: next(free) for f in template.fields}
    ids, positions = [start] + pieces[0], {}
    for field_name, piece in zip(template.fields, pieces[1:]):
        positions[field_name] = len(ids)
        ids += [token_ids[field_name]] + piece
    ids.append(end)
    if len(ids) > length:
        raise ValueError(f"{name}: {len(ids) - 2} tokens, but the text encoder reads one chunk of {length - 2} "
                         f"(start and end tokens aside); shorten the prompt")
    used_length = len(ids)
    ids += [pad] * (length - len(ids))
    return TokenizedTemplate(torch.tensor([ids], dtype=torch.long), token_ids, positions, used_length)


# -------------------------------------------------------------------------------- view tokens

@dataclass
class DTUOrbitFrame:
    """Where an orbit around the origin goes in the DTU scene (our +Y-up world, millimetres).

    ``center``: the point the DTU cameras look at; ``rotation`` columns: the frame's x (right), y (up)
    and z (towards the middle of the camera rig); ``distance``: the cameras' mean distance to the centre.
    Azimuth 0 / elevation 0 of an orbit is then the middle of the DTU rig, and ``reference_radius``
    scene units are ``distance`` millimetres.
    """

    center: torch.Tensor    # (3,) float64
    rotation: torch.Tensor  # (3, 3) float64
    distance: float

    @classmethod
    def from_cameras(cls, cameras: Cameras) -> "DTUOrbitFrame":
        center = dtu_scene_center(cameras)
        offsets = cameras.centers - center
        front = offsets.mean(0)
        front = front / front.norm()
        up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        right = torch.linalg.cross(up, front)
        if right.norm() < 1e-6:
            raise ValueError("the DTU cameras look straight down: no horizontal front direction for an orbit")
        right = right / right.norm()
        up = torch.linalg.cross(front, right)
        return cls(center, torch.stack([right, up, front], dim=1), float(offsets.norm(dim=-1).mean()))

    @classmethod
    def from_calibration(cls, calibration: DTUCalibration) -> "DTUOrbitFrame":
        return cls.from_cameras(calibration.to_cameras())

    def place(self, cameras: Cameras, reference_radius: float) -> Cameras:
        """Cameras of an orbit around the origin (scene units) -> cameras in the DTU scene."""
        if not math.isfinite(reference_radius) or reference_radius <= 0:
            raise ValueError(f"reference_radius must be a finite number > 0, got {reference_radius}")
        scale = self.distance / float(reference_radius)
        c2w = cameras.c2w.clone()
        c2w[:, :3, :3] = self.rotation @ cameras.c2w[:, :3, :3]
        c2w[:, :3, 3] = self.center + scale * (cameras.c2w[:, :3, 3] @ self.rotation.T)
        return Cameras(c2w, cameras.intrinsics, cameras.width, cameras.height)


PLACEMENTS = ("orbit around the DTU rig", "DTU scene coordinates")


@dataclass
class ViewRows:
    """One row per requested view: its token string and the mapper's normalised camera numbers."""

    tokens: List[str]
    params: torch.Tensor  # (N, k) float32
    labels: List[str] = field(default_factory=list)  # "DTU camera 25", "camera 3", for messages

    def __len__(self) -> int:
        return len(self.tokens)


def parse_dtu_keys(text: str, calibration: DTUCalibration, name: str = "dtu_cameras") -> List[int]:
    """'25' / '22, 25, 28' / '0-63' -> calibration keys (0-based DTU camera indices)."""
    keys = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if match is None:
            raise ValueError(f"{name}: cannot read {part!r}; use DTU camera indices and ranges like '22, 25, 28' "
                             "or '0-63'")
        if match.group(3) is not None:
            keys.append(int(match.group(3)))
        else:
            a, b = int(match.group(1)), int(match.group(2))
            keys.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    if not keys:
        raise ValueError(f"{name}: no camera index given; e.g. '25' (the single-view training camera)")
    missing = [k for k in keys if k not in calibration.keys]
    if missing:
        raise ValueError(f"{name}: DTU camera {missing[0]} is not in the calibration "
                         f"(cameras {min(calibration.keys)}..{max(calibration.keys)})")
    return keys


def check_view_range(rows: ViewRows, max_extrapolation: float, name: str) -> None:
    """Refuse views whose normalised numbers leave [-1 - m, 1 + m]: the mapper only saw [-1, 1]."""
    if not torch.isfinite(rows.params).all():
        bad = int((~torch.isfinite(rows.params)).any(-1).nonzero()[0])
        raise ValueError(f"{name}: {rows.labels[bad] if rows.labels else bad} has non-finite camera numbers")
    limit = 1.0 + float(max_extrapolation)
    worst = rows.params.abs().max(-1)
    index = int(worst.values.argmax())
    if worst.values[index] > limit:
        entry = int(worst.indices[index])
        names = DTU_PROJECTION_ENTRIES if rows.params.shape[-1] == 12 else ("theta", "phi")[-rows.params.shape[-1]:]
        label = rows.labels[index] if rows.labels else f"view {index}"
        raise ValueError(f"{name}: {label} is outside the camera range the view mapper was trained on: its "
                         f"{names[entry]} normalises to {float(rows.params[index, entry]):.2f}, the training views "
                         f"span -1..1 and max_extrapolation {max_extrapolation:g} allows +-{limit:g}; move the "
                         "camera towards the training views (or raise max_extrapolation)")


def dtu_rows_for_keys(model: ViewNetiModel, calibration: DTUCalibration, keys: Sequence[int]) -> ViewRows:
    tokens = [calibration.token(k) for k in keys]
    return ViewRows(tokens, model.view_inputs(tokens), [f"DTU camera {k}" for k in keys])


def dtu_rows_for_cameras(model: ViewNetiModel, cameras: Cameras, placement: str,
                         calibration: Optional[DTUCalibration] = None, reference_radius: float = 2.0,
                         name: str = "cameras") -> ViewRows:
    """View rows for ``NVS_CAMERA`` targets in the DTU convention (see :data:`PLACEMENTS`)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"camera_placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if placement == PLACEMENTS[0]:
        if calibration is None:
            raise ValueError(f"{name}: placing an orbit around the DTU rig needs the DTU camera positions, i.e. a "
                             "calibration folder (Calibration/cal18) in NVS ViewNeTI Loader; with only the 24 "
                             f"range numbers, give cameras in DTU scene coordinates ({PLACEMENTS[1]!r})")
        cameras = DTUOrbitFrame.from_calibration(calibration).place(cameras, reference_radius)
    tokens = dtu_view_tokens_for_cameras(cameras)
    return ViewRows(tokens, model.view_inputs(tokens), [f"camera {i}" for i in range(len(tokens))])


def spherical_rows_for_cameras(model: ViewNetiModel, cameras: Cameras) -> ViewRows:
    """Spherical view tokens (theta = 90 - elevation, phi = azimuth, around the origin) for cameras."""
    if not isinstance(model.view_range, SphericalViewRange):
        raise ValueError("the view mapper has no spherical view range: load it with its learned_embeds file")
    views = spherical_view_from_cameras(cameras)
    tokens = [format_spherical_view_token(*(float(v) for v in row)) for row in views]
    return ViewRows(tokens, model.view_inputs(tokens), [f"camera {i}" for i in range(len(tokens))])


def view_rows(model: ViewNetiModel, cameras: Optional[Cameras] = None, dtu_cameras: str = "",
              calibration: Optional[DTUCalibration] = None, placement: str = PLACEMENTS[0],
              reference_radius: float = 2.0, max_extrapolation: float = DEFAULT_MAX_EXTRAPOLATION) -> ViewRows:
    """The views to render: ``cameras`` if given, else the DTU calibration cameras ``dtu_cameras``."""
    mapper = model.view
    if mapper is None:
        raise ValueError("view_mapper: no view mapper is loaded")
    if model.view_range is None:
        what = ("a DTU calibration folder (Calibration/cal18) or the 24 range numbers"
                if mapper.camera_representation == "dtu-12d" else "its learned_embeds file (the training views)")
        raise ValueError(f"view_mapper: the view mapper has no camera range to normalise views with; load it "
                         f"with {what} in NVS ViewNeTI Loader")
    spherical = isinstance(model.view_range, SphericalViewRange)
    if cameras is not None:
        if len(cameras) == 0:
            raise ValueError("cameras: the camera batch is empty")
        rows = (spherical_rows_for_cameras(model, cameras) if spherical
                else dtu_rows_for_cameras(model, cameras, placement, calibration, reference_radius))
        name = "cameras"
    else:
        if spherical:
            raise ValueError("cameras: this view mapper uses spherical (theta, phi) views, not DTU cameras; "
                             "connect cameras")
        if calibration is None:
            raise ValueError("dtu_cameras: choosing DTU cameras by index needs the calibration folder "
                             "(Calibration/cal18) in NVS ViewNeTI Loader; or connect cameras")
        rows = dtu_rows_for_keys(model, calibration, parse_dtu_keys(dtu_cameras, calibration))
        name = "dtu_cameras"
    check_view_range(rows, max_extrapolation, name)
    return rows


# ------------------------------------------------------------------------------ whole prompt

@dataclass
class ViewNetiPrompt:
    """Everything :class:`BoundedViewNetiContexts` needs for one template and a batch of views."""

    template: PromptTemplate
    tokens: TokenizedTemplate
    views: Optional[ViewRows]
    object_token: Optional[str]

    @property
    def rows(self) -> int:
        return len(self.views) if self.views is not None else 1

    def describe(self) -> str:
        lines = [f"prompt: {self.template.text!r} ({self.tokens.length} tokens)"]
        if self.object_token:
            lines.append(f"object mapper: {self.object_token}")
        if self.views is not None:
            shown = ", ".join(self.views.labels[:4]) + (" ..." if len(self.views) > 4 else "")
            count = len(self.views)
            lines.append(f"{count} view{'s' if count != 1 else ''} ({shown}); latent batch must be {count}")
            lines.append(f"first view token: {self.views.tokens[0]}")
        return "\n".join(lines)


def pick_object_token(model: ViewNetiModel, object_token: str = "", name: str = "object_token") -> str:
    tokens = list(model.objects)
    if not tokens:
        raise ValueError("prompt_template: the template uses {object} but no object mapper is loaded")
    wanted = (object_token or "").strip()
    if not wanted:
        if len(tokens) > 1:
            raise ValueError(f"{name}: the object mapper file holds {len(tokens)} objects {tokens[:6]}; name one")
        return tokens[0]
    if wanted not in model.objects:
        raise ValueError(f"{name}: {wanted!r} is not in the object mapper file; it holds {tokens[:6]}")
    return wanted


def plan_template(model: ViewNetiModel, template_text: str, object_token: str = "") -> Tuple[PromptTemplate,
                                                                                           Optional[str]]:
    """The parsed template, checked against the model's mappers, and the object token filling {object}."""
    template = PromptTemplate.parse(template_text)
    check_template_fields(template, model.view is not None, bool(model.objects))
    return template, (pick_object_token(model, object_token) if template.has("object") else None)


def build_prompt(model: ViewNetiModel, template_text: str, tokenize: Tokenize, vocab_size: int,
                 views: Optional[ViewRows], object_token: str = "",
                 planned: Optional[Tuple[PromptTemplate, Optional[str]]] = None) -> ViewNetiPrompt:
    """The prompt for ``views`` (see :func:`plan_template`; ``planned`` is its result, if already made)."""
    template, chosen = planned or plan_template(model, template_text, object_token)
    if template.has("view") and views is None:
        raise ValueError("the view mapper needs the views to render (cameras or DTU camera indices)")
    return ViewNetiPrompt(template, tokenize_template(template, tokenize, vocab_size),
                          views if template.has("view") else None, chosen)


def check_word_width(model: ViewNetiModel, text_width: int, name: str = "view_mapper") -> None:
    """The mappers' word vectors must have the text encoder's token width (1024: SD 2.x; 768: SD 1.x)."""
    known = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)"}
    for label, mapper in [("view mapper", model.view)] + [(f"object mapper {t}", m) for t, m in model.objects.items()]:
        if mapper is not None and int(mapper.word_dim) != int(text_width):
            raise ValueError(f"{name}: the {label} makes {mapper.word_dim}-wide word embeddings "
                             f"({known.get(int(mapper.word_dim), 'another model')}) but the CLIP encodes "
                             f"{text_width}-wide tokens ({known.get(int(text_width), 'another model')}); use the "
                             "checkpoint the mapper was trained with (ViewNeTI: SD 2.1, 768-v)")


# ---------------------------------------------------------------------------------- contexts

class BoundedViewNetiContexts(ViewNetiContexts):
    """``ViewNetiContexts`` whose cache never holds more than ``max_cache_bytes`` (at least one step).

    ``prepare(timesteps)`` precomputes the first steps of the schedule that fit; the others are computed
    when sampling reaches them, evicting the oldest cached steps (sampling never goes back). ``check_batch``
    refuses a latent batch that does not hold one latent per view; ``on_release`` runs after sampling.
    """

    def __init__(self, *args, max_cache_bytes: Optional[int] = None, on_release: Optional[Callable[[], None]] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.max_cache_bytes = None if max_cache_bytes is None else max(0, int(max_cache_bytes))
        self.on_release = on_release
        self.precomputed = 0

    @property
    def word_dim(self) -> int:
        mapper = self.view_mapper if self.view_mapper is not None else self.object_mapper
        return int(mapper.word_dim)

    def step_bytes(self) -> int:
        """Cache bytes of one timestep: keys (16 layers x rows x T x D) + the bypassed value rows."""
        element = torch.empty((), dtype=self.cache_dtype or torch.float32).element_size()
        per_row = self.input_ids.shape[-1] + self._bypass_positions.shape[1]
        return 16 * self.rows * per_row * self.word_dim * element

    def steps_in_budget(self) -> Optional[int]:
        if self.max_cache_bytes is None:
            return None
        return max(1, self.max_cache_bytes // max(1, self.step_bytes()))

    def check_batch(self, batch: int) -> None:
        if self.rows > 1 and int(batch) != self.rows:
            raise ValueError(f"the latent batch holds {batch} latents but NVS ViewNeTI Apply was given {self.rows} "
                             f"views: set the latent batch_size to {self.rows} (one latent per camera)")

    def prepare(self, timesteps, progress=None) -> None:
        if not self.use_cache:
            return
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
        keep = self.steps_in_budget()
        if keep is not None:
            timesteps = timesteps[:keep]
        self.precomputed = int(timesteps.numel())
        super().prepare(timesteps, progress)

    def _store(self, t: float):
        entry = super()._store(t)
        keep = self.steps_in_budget()
        if keep is not None:
            while len(self._cache) > keep:
                oldest = next(iter(self._cache))
                if self._cache[oldest] is entry:
                    break
                del self._cache[oldest]
        return entry

    def release(self) -> None:
        super().release()
        if self.on_release is not None:
            self.on_release()


def contexts_for_prompt(backend, model: ViewNetiModel, prompt: ViewNetiPrompt,
                        max_cache_bytes: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                        on_release: Optional[Callable[[], None]] = None) -> BoundedViewNetiContexts:
    """The cross-attention context provider for ``backend`` (any ``SDBackend``)."""
    view = model.view if prompt.template.has("view") else None
    obj = model.objects[prompt.object_token] if prompt.object_token else None
    return BoundedViewNetiContexts(
        backend, prompt.tokens.input_ids,
        view_mapper=view, view_token_ids=prompt.tokens.token_ids.get("view") if view is not None else None,
        view_params=prompt.views.params if view is not None else None,
        object_mapper=obj, object_token_id=prompt.tokens.token_ids.get("object") if obj is not None else None,
        cache_dtype=cache_dtype, max_cache_bytes=max_cache_bytes, on_release=on_release)


# ------------------------------------------------------------------ the calibration of a model

def attach_calibration(model: ViewNetiModel, calibration: Optional[DTUCalibration]) -> ViewNetiModel:
    """Keep the DTU calibration cameras with a model (for DTU indices and orbit placement)."""
    model.dtu_calibration = calibration
    return model


def calibration_of(model: ViewNetiModel) -> Optional[DTUCalibration]:
    return getattr(model, "dtu_calibration", None)


def parse_calibration_numbers(text: str) -> Optional[List[float]]:
    """24 numbers separated by commas, spaces or newlines, or None if the text is not a list of numbers."""
    parts = [p for p in re.split(r"[\s,;\[\]]+", str(text).strip()) if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return None
    return numbers if numbers else None


def camera_range_from_numbers(numbers: Sequence[float], name: str = "dtu_calibration") -> DTUCameraRange:
    if len(numbers) != 24:
        raise ValueError(f"{name}: {len(numbers)} numbers; the DTU camera range is 24 numbers (the 12 minima, "
                         "then the 12 maxima of P00..P23)")
    try:
        return DTUCameraRange.from_numbers(numbers)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
