"""Camera numbers for ViewNeTI's view mapper: DTU "dtu-12d" tokens and spherical tokens.

DTU (what the published checkpoints use):
- a camera is its 3x4 projection matrix P = K [R | t] for the 1600x1200 DTU image, read from
  ``Calibration/cal18/pos_NNN.txt`` of the DTU SampleSet and stored as float32 (camera key NNN - 1);
- its token is ``<view_dtu12d_cam{key}_{P00}_..._{P23}>``: integers print bare, anything else with
  exactly 4 decimals (Python's correctly rounded formatting of the float32 value), "." written "p";
- the mapper sees the numbers parsed back from the token (float32), scaled per entry to [-1, 1] with
  the min/max of the *raw* float32 matrices of all calibration files, without clamping.

DTU's world and ours: DTU's scan frame (millimetres) has +Y pointing down and +Z pointing away from
the cameras, like an OpenCV camera standing in front of the scene (pos_001.txt's image-down axis is
DTU +Y, its viewing axis mostly +Z). Our world is +Y up, so a DTU point (x, y, z) is (x, -y, -z) here:
a 180 degree turn about X, exact in floating point, units kept in mm.
Tokens are always made from the DTU-convention matrices; :class:`DTUCalibration` keeps the files'
float32 numbers, because going through ``Cameras`` drops DTU's tiny pixel skew and the matrix scale.

Spherical (non-DTU data): tokens ``<view_{theta}_{phi}_{r}>`` taken from image file names; theta and phi
are scaled to [-1, 1] over the training tokens and r is unused.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..cameras import Cameras

log = logging.getLogger(__name__)

DTU_IMAGE_WIDTH, DTU_IMAGE_HEIGHT = 1600, 1200
DTU_CALIBRATION_COUNT = 64
DTU_TOKEN_DECIMALS = 4
SPHERICAL_TOKEN_DECIMALS = 2  # upstream's default for num_to_string; its tokens come from file names
NOVEL_CAMERA_FIRST_KEY = 100
DTU_PROJECTION_ENTRIES = tuple(f"P{r}{c}" for r in range(3) for c in range(4))

# DTU scan frame -> our +Y-up world: (x, y, z) -> (x, -y, -z).
DTU_TO_Y_UP = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))

_DTU_TOKEN_RE = re.compile(r"^<view_dtu12d_cam([^_>]+)((?:_[^_>]+){12})>$")
_CALIBRATION_FILE_RE = re.compile(r"^pos_(\d+)\.txt$")


# ------------------------------------------------------------------------------------ numbers

def number_to_token_text(value: float, decimals: int = DTU_TOKEN_DECIMALS) -> str:
    """Upstream's ``num_to_string``: integers bare (``-3``), others with ``decimals`` places, "." -> "p".

    The sign of a negative number that rounds to zero is kept (``-0p0000``); -0.0 itself is an integer
    and prints ``0``.
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"camera number {value} cannot be written into a view token")
    if int(value) - value == 0:
        return str(int(value))
    return f"{value:.{decimals}f}".replace(".", "p")


def token_text_to_number(text: str) -> float:
    """Upstream's ``string_to_num``: "p" -> "." and parse (``-0p0000`` gives -0.0)."""
    try:
        return float(text.replace("p", "."))
    except ValueError:
        raise ValueError(f"{text!r} is not a view-token number (digits with 'p' for the decimal point)") from None


# --------------------------------------------------------------------------------- DTU tokens

@dataclass(frozen=True)
class DTUViewToken:
    """A parsed DTU view token."""

    text: str
    key: Union[int, str]      # camera key (0-based DTU index, or any label for a novel camera)
    values: torch.Tensor      # (12,) float32: what the view mapper sees before normalisation


def is_dtu_view_token(token: str) -> bool:
    return isinstance(token, str) and "dtu12d" in token


def _projection_as_float32(projection) -> torch.Tensor:
    P = torch.as_tensor(projection)
    if P.numel() != 12:
        raise ValueError(f"a DTU camera is a 3x4 projection matrix (12 numbers), got shape {tuple(P.shape)}")
    return P.reshape(12).to(torch.float32)


def format_dtu_view_token(projection, key: Union[int, str] = "NULL") -> str:
    """The view token of one camera; ``projection`` (3x4 or 12 numbers) is rounded to float32 first."""
    key = str(key)
    if not key or "_" in key or ">" in key:
        raise ValueError(f"camera key {key!r} cannot be part of a view token (no '_' or '>')")
    numbers = "_".join(number_to_token_text(v, DTU_TOKEN_DECIMALS) for v in _projection_as_float32(projection).tolist())
    return f"<view_dtu12d_cam{key}_{numbers}>"


def parse_dtu_view_token(token: str, int_key: bool = False) -> DTUViewToken:
    """Camera key and the 12 numbers (float32) of a DTU view token.

    ``int_key=True`` requires an integer key, as upstream's view mapper does when it builds its lookup.
    """
    match = _DTU_TOKEN_RE.match(token) if isinstance(token, str) else None
    if match is None:
        raise ValueError(f"not a DTU view token: {str(token)[:80]!r}; expected "
                         "<view_dtu12d_cam{key}_{12 numbers separated by '_'}>")
    key_text = match.group(1)
    if re.fullmatch(r"-?\d+", key_text):
        key: Union[int, str] = int(key_text)
    elif int_key:
        raise ValueError(f"view token camera key {key_text!r} is not an integer (upstream's view mapper "
                         f"requires one): {token[:60]}...")
    else:
        key = key_text
    values = torch.tensor([token_text_to_number(n) for n in match.group(2)[1:].split("_")], dtype=torch.float32)
    return DTUViewToken(token, key, values)


def parse_dtu_view_tokens(tokens: Iterable[str]) -> torch.Tensor:
    """(N, 12) float32 camera numbers of N DTU view tokens."""
    tokens = list(tokens)
    if not tokens:
        return torch.zeros((0, 12), dtype=torch.float32)
    return torch.stack([parse_dtu_view_token(t).values for t in tokens])


# ------------------------------------------------------------------------- calibration files

def read_dtu_projection(path) -> torch.Tensor:
    """One ``pos_NNN.txt``: 3 lines of 4 numbers, parsed as Python floats, stored as float32 (3, 4)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read DTU calibration file ({e.strerror or e})") from None
    try:
        rows = [[float(n) for n in line.split()] for line in text.splitlines() if line.strip()]
    except ValueError:
        raise ValueError(f"{path}: expected 3 lines of 4 numbers (a DTU 3x4 projection matrix)") from None
    if len(rows) != 3 or any(len(r) != 4 for r in rows):
        raise ValueError(f"{path}: expected 3 lines of 4 numbers (a DTU 3x4 projection matrix), "
                         f"got {len(rows)} lines with {[len(r) for r in rows]} numbers")
    return torch.tensor(rows, dtype=torch.float32)


def _calibration_folder(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"DTU calibration folder not found: {path} (expected the DTU SampleSet "
                                "'Calibration/cal18' folder with pos_001.txt ... pos_064.txt)")
    for sub in ("Calibration/cal18", "cal18"):  # also accept the SampleSet root or Calibration/
        if not any(path.glob("pos_*.txt")) and (path / sub).is_dir():
            path = path / sub
    return path


@dataclass
class DTUCalibration:
    """DTU cameras as the calibration files give them: keys (0-based) and float32 3x4 matrices."""

    keys: List[int]
    projections: torch.Tensor  # (N, 3, 4) float32, DTU world and pixels of the 1600x1200 image
    source: str = ""

    def __post_init__(self):
        self.projections = torch.as_tensor(self.projections, dtype=torch.float32).reshape(-1, 3, 4)
        self.keys = [int(k) for k in self.keys]
        if len(self.keys) != len(self.projections) or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"DTU calibration needs one unique key per matrix, got {len(self.keys)} keys "
                             f"for {len(self.projections)} matrices")

    @classmethod
    def from_folder(cls, folder, count: int = DTU_CALIBRATION_COUNT) -> "DTUCalibration":
        """Read ``pos_001.txt`` ... ``pos_{count}.txt`` (more ``pos_NNN.txt`` files are read too, as
        upstream reads every file of the folder). Missing files raise, naming the first one."""
        folder = _calibration_folder(folder)
        numbers = {}
        for f in folder.iterdir():
            match = _CALIBRATION_FILE_RE.match(f.name)
            if match:
                numbers[int(match.group(1))] = f
            elif f.suffix == ".txt":
                log.info("%s: ignoring %s (not a pos_NNN.txt calibration file)", folder, f.name)
        missing = [n for n in range(1, count + 1) if n not in numbers]
        if missing:
            raise FileNotFoundError(f"{folder}: missing DTU calibration file pos_{missing[0]:03d}.txt "
                                    f"({len(missing)} of pos_001.txt ... pos_{count:03d}.txt missing)")
        order = sorted(numbers)
        return cls([n - 1 for n in order], torch.stack([read_dtu_projection(numbers[n]) for n in order]),
                   str(folder))

    def __len__(self) -> int:
        return len(self.keys)

    def projection(self, key: int) -> torch.Tensor:
        try:
            return self.projections[self.keys.index(int(key))]
        except ValueError:
            raise KeyError(f"camera key {key} is not in the DTU calibration (keys {min(self.keys)}..{max(self.keys)}); "
                           "for a novel view give its projection matrix or its Cameras") from None

    def token(self, key: int) -> str:
        return format_dtu_view_token(self.projection(key), int(key))

    def tokens(self) -> List[str]:
        return [format_dtu_view_token(P, k) for k, P in zip(self.keys, self.projections)]

    def camera_range(self) -> "DTUCameraRange":
        return DTUCameraRange.from_projections(self.projections)

    def to_cameras(self) -> Cameras:
        return cameras_from_dtu_projections(self.projections)


# ----------------------------------------------------------------------------- normalisation

@dataclass
class DTUCameraRange:
    """Per-entry min and max of the 12 DTU camera numbers: the view mapper's input normalisation.

    Published mapper files do not store it: compute it from the DTU SampleSet ``Calibration/cal18`` folder
    (:meth:`from_calibration_folder`) or give the 24 numbers (:meth:`from_numbers`). Mappers trained by
    this pack store it in their view file's config.
    """

    mins: torch.Tensor  # (12,) float32
    maxs: torch.Tensor  # (12,) float32

    def __post_init__(self):
        self.mins = torch.as_tensor(self.mins, dtype=torch.float32).reshape(-1)
        self.maxs = torch.as_tensor(self.maxs, dtype=torch.float32).reshape(-1)
        if self.mins.numel() != 12 or self.maxs.numel() != 12:
            raise ValueError(f"a DTU camera range needs 12 minima and 12 maxima, got {self.mins.numel()} "
                             f"and {self.maxs.numel()}")
        flat = (self.maxs <= self.mins) | ~torch.isfinite(self.maxs - self.mins)
        if flat.any():
            i = int(flat.nonzero()[0])
            raise ValueError(f"DTU camera range has no extent for entry {DTU_PROJECTION_ENTRIES[i]} "
                             f"(min {self.mins[i].item()}, max {self.maxs[i].item()}): cameras cannot be "
                             "normalised on it; use the range of the full 64-camera calibration")

    @classmethod
    def from_projections(cls, projections) -> "DTUCameraRange":
        """Min/max over raw float32 matrices (N, 3, 4), not over the rounded token numbers."""
        flat = torch.as_tensor(projections).to(torch.float32).reshape(-1, 12)
        if len(flat) < 2:
            raise ValueError("a DTU camera range needs at least 2 calibration cameras")
        return cls(flat.min(0).values, flat.max(0).values)

    @classmethod
    def from_calibration_folder(cls, folder, count: int = DTU_CALIBRATION_COUNT) -> "DTUCameraRange":
        return DTUCalibration.from_folder(folder, count).camera_range()

    @classmethod
    def from_numbers(cls, numbers: Sequence[float]) -> "DTUCameraRange":
        """24 numbers: the 12 minima, then the 12 maxima (row-major P00 ... P23)."""
        numbers = [float(n) for n in numbers]
        if len(numbers) != 24:
            raise ValueError(f"a DTU camera range is 24 numbers (12 minima then 12 maxima), got {len(numbers)}")
        return cls(numbers[:12], numbers[12:])

    def to_numbers(self) -> List[float]:
        return self.mins.tolist() + self.maxs.tolist()

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """(values - min)/(max - min)*2 - 1 in float32; no clamping, so novel cameras may leave [-1, 1]."""
        values = torch.as_tensor(values).to(torch.float32)
        if values.shape[-1] != 12:
            raise ValueError(f"DTU camera numbers come in rows of 12, got shape {tuple(values.shape)}")
        return (values - self.mins) / (self.maxs - self.mins) * 2 - 1

    def normalize_tokens(self, tokens: Iterable[str]) -> torch.Tensor:
        return self.normalize(parse_dtu_view_tokens(tokens))


# --------------------------------------------------------------------------- DTU <-> Cameras

def cameras_from_dtu_projections(projections, width: int = DTU_IMAGE_WIDTH,
                                 height: int = DTU_IMAGE_HEIGHT) -> Cameras:
    """DTU 3x4 matrices (N, 3, 4) -> ``Cameras`` in our +Y-up world (millimetres kept)."""
    P = torch.as_tensor(projections, dtype=torch.float64).reshape(-1, 3, 4)
    return Cameras.from_projection(P, width, height, world="y_up").transformed(DTU_TO_Y_UP)


def dtu_projection_scale(projections) -> torch.Tensor:
    """(N,) scale of each matrix: the norm of its third row's rotation part (about 1 for DTU files)."""
    P = torch.as_tensor(projections, dtype=torch.float64).reshape(-1, 3, 4)
    return P[:, 2, :3].norm(dim=-1)


def dtu_projections_from_cameras(cameras: Cameras, scale=None) -> torch.Tensor:
    """``Cameras`` (our world, DTU scene units) -> DTU 3x4 matrices (N, 3, 4), float64, pixels of the
    1600x1200 image. ``scale`` ((N,) or a number, default 1) restores a file's matrix scale."""
    P = cameras.transformed(torch.linalg.inv(DTU_TO_Y_UP)).to_projection(DTU_IMAGE_WIDTH, DTU_IMAGE_HEIGHT)
    if scale is not None:
        P = P * torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1, 1)
    return P


def dtu_view_tokens_for_cameras(cameras: Cameras, keys: Optional[Sequence[Union[int, str]]] = None) -> List[str]:
    """View tokens for any cameras placed in the DTU scene (novel views). Keys default to 100, 101, ...
    (integers, since upstream's lookup needs integer keys; DTU's own cameras are 0..63)."""
    P = dtu_projections_from_cameras(cameras)
    keys = list(keys) if keys is not None else list(range(NOVEL_CAMERA_FIRST_KEY, NOVEL_CAMERA_FIRST_KEY + len(P)))
    if len(keys) != len(P):
        raise ValueError(f"{len(P)} cameras but {len(keys)} keys")
    return [format_dtu_view_token(p, k) for p, k in zip(P, keys)]


def dtu_scene_center(cameras: Cameras) -> torch.Tensor:
    """The point closest (least squares) to all optical axes: where DTU's cameras look, in our world.
    Build novel orbits around it, e.g. ``Cameras.from_spherical(..., target=center, radius=600)``."""
    if len(cameras) < 2:
        raise ValueError("need at least 2 cameras to find the point they look at")
    forward = cameras.c2w[:, :3, 2]
    projector = torch.eye(3, dtype=torch.float64) - forward[:, :, None] * forward[:, None, :]
    return torch.linalg.solve(projector.sum(0), (projector @ cameras.centers[:, :, None]).sum(0)).reshape(3)


# ---------------------------------------------------------------------------------- spherical

def format_spherical_view_token(theta: float, phi: float, radius: float,
                                decimals: int = SPHERICAL_TOKEN_DECIMALS) -> str:
    return "<view_" + "_".join(number_to_token_text(v, decimals) for v in (theta, phi, radius)) + ">"


def parse_spherical_view_token(token: str) -> Tuple[float, float, float]:
    """(theta, phi, r) of ``<view_{theta}_{phi}_{r}>`` as Python floats."""
    wrapped = isinstance(token, str) and token.startswith("<view_") and token.endswith(">")
    parts = token[6:-1].split("_") if wrapped else []
    if len(parts) != 3 or is_dtu_view_token(token):
        raise ValueError(f"not a spherical view token: {str(token)[:80]!r}; expected <view_{{theta}}_{{phi}}_{{r}}>")
    theta, phi, radius = (token_text_to_number(p) for p in parts)
    return theta, phi, radius


def _scale_to_unit(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # Upstream leaves a constant parameter as it is instead of dividing by zero.
    return x if low == high else (x - low) / (high - low) * 2 - 1


@dataclass
class SphericalViewRange:
    """Min/max of theta, phi and r over the training view tokens (float32 values as Python floats)."""

    theta: Tuple[float, float]
    phi: Tuple[float, float]
    radius: Tuple[float, float]

    @classmethod
    def from_tokens(cls, training_tokens: Sequence[str]) -> "SphericalViewRange":
        """The range upstream computes from the training tokens (the view keys of learned_embeds)."""
        if not training_tokens:
            raise ValueError("the spherical view range needs the training view tokens "
                             "(the <view_...> keys of learned_embeds-steps-N.bin)")
        params = torch.tensor([parse_spherical_view_token(t) for t in training_tokens], dtype=torch.float32)
        low, high = params.min(0).values.tolist(), params.max(0).values.tolist()
        return cls((low[0], high[0]), (low[1], high[1]), (low[2], high[2]))

    @property
    def degrees_of_freedom(self) -> str:
        """"phi" when every training view has the same theta, else "theta-phi" (r is never used)."""
        return "phi" if self.theta[0] == self.theta[1] else "theta-phi"

    def normalize(self, thetas: Sequence[float], phis: Sequence[float]) -> torch.Tensor:
        """(N, 1) [phi] or (N, 2) [theta, phi], float32, scaled as upstream (no clamping)."""
        phi = _scale_to_unit(torch.tensor(list(phis), dtype=torch.float32)[:, None], *self.phi)
        if self.degrees_of_freedom == "phi":
            return phi
        theta = _scale_to_unit(torch.tensor(list(thetas), dtype=torch.float32)[:, None], *self.theta)
        return torch.cat((theta, phi), dim=1)

    def normalize_tokens(self, tokens: Iterable[str]) -> torch.Tensor:
        params = [parse_spherical_view_token(t) for t in tokens]
        return self.normalize([p[0] for p in params], [p[1] for p in params])


def spherical_view_from_cameras(cameras: Cameras, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """(N, 3) [theta, phi, r] of camera centres around ``target``: theta the polar angle from +Y and phi
    the azimuth (our convention: 0 on +Z, positive counter-clockwise from above), both in degrees.

    Upstream takes these numbers from file names and defines no convention; this is ours, so that
    theta = 90 - elevation and phi = azimuth of the orbit builders.
    """
    offset = cameras.centers - torch.as_tensor(target, dtype=torch.float64).reshape(1, 3)
    radius = offset.norm(dim=-1)
    if torch.any(radius <= 0):
        raise ValueError("a camera sits on the target point: its spherical view is undefined")
    theta = torch.rad2deg(torch.acos((offset[:, 1] / radius).clamp(-1, 1)))
    phi = torch.rad2deg(torch.atan2(offset[:, 0], offset[:, 2]))
    return torch.stack([theta, phi, radius], dim=-1)
