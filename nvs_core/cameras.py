"""The pack's one camera type (``NVS_CAMERA``) and its builders and converters.

Convention (ARCHITECTURE.md section 3):
- world: right-handed, +Y up (glTF / three.js);
- camera: OpenCV axes, x right, y down, z forward; ``c2w`` maps camera to world coordinates;
- intrinsics are stored normalised by the nominal image size: (fx/W, fy/H, cx/W, cy/H), so a
  camera survives resizing; pixel intrinsics are made for any size on demand;
- spherical parameters: elevation > 0 puts the camera above the target, azimuth 0 puts it on the
  +Z axis, and a positive azimuth is a right-handed turn about +Y, i.e. counter-clockwise seen from
  above, so azimuth +90 degrees puts the camera on +X. Angles are radians here; nodes take degrees.

Cameras are stored in float64 on the CPU: they are tiny and relative poses need the precision.
Rays and Plücker maps are produced in the dtype/device the caller asks for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from kornia.geometry.quaternion import Quaternion

Tensorish = Union[torch.Tensor, Sequence[float], float]

# Camera-axis conventions: the matrix that maps OpenCV camera axes to the convention's axes.
# OpenGL and Blender cameras look down -z with y up; Blender worlds are additionally Z-up.
_OPENCV_TO_OPENGL_AXES = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
# Maps Y-up world coordinates to Z-up world coordinates: (x, y, z) -> (x, -z, y).
_YUP_TO_ZUP = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)

CONVENTIONS = ("opencv", "opengl", "blender")


def _as_tensor(value: Tensorish, n: Optional[int] = None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if n is not None and t.numel() == 1:
        t = t.expand(n)
    return t


def focal_from_fov(fov: Tensorish) -> torch.Tensor:
    """Normalised focal length (f / image extent) for a field of view in radians."""
    fov = _as_tensor(fov)
    if torch.any((fov <= 0) | (fov >= math.pi)):
        raise ValueError(f"field of view must be in (0, 180) degrees, got {torch.rad2deg(fov).tolist()}")
    return 0.5 / torch.tan(0.5 * fov)


def fov_from_focal(focal_normalised: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.atan(0.5 / focal_normalised)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: Tensorish = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """OpenCV camera-to-world matrices [N,4,4] for cameras at ``eye`` [N,3] looking at ``target``.

    The image's up direction is the projection of ``up``; where the view direction is parallel to
    ``up`` the camera keeps world +X as its image right (the limit of the orbit builder).
    """
    eye = torch.as_tensor(eye, dtype=torch.float64).reshape(-1, 3)
    target = torch.as_tensor(target, dtype=torch.float64).reshape(-1, 3).expand_as(eye)
    up = torch.as_tensor(up, dtype=torch.float64).reshape(-1, 3).expand_as(eye)
    forward = target - eye
    dist = forward.norm(dim=-1, keepdim=True)
    if torch.any(dist < 1e-12):
        raise ValueError("camera position coincides with its look-at target")
    forward = forward / dist
    right = torch.linalg.cross(forward, up)
    degenerate = right.norm(dim=-1) < 1e-9
    if degenerate.any():
        right[degenerate] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=torch.float64).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, eye
    return c2w


def spherical_c2w(elevation: Tensorish, azimuth: Tensorish, radius: Tensorish,
                  target: Tensorish = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Camera-to-world [N,4,4] on a sphere around ``target`` (radians), image-up towards +Y.

    Built from the spherical frame rather than look-at so that elevation +-90 degrees is
    continuous: image right is always the azimuthal tangent (cos az, 0, -sin az).
    """
    elevation, azimuth, radius = torch.broadcast_tensors(_as_tensor(elevation), _as_tensor(azimuth),
                                                         _as_tensor(radius))
    if torch.any(radius <= 0):
        raise ValueError(f"radius must be > 0, got {radius.tolist()}")
    target = torch.as_tensor(target, dtype=torch.float64).reshape(-1, 3)
    ce, se, ca, sa = elevation.cos(), elevation.sin(), azimuth.cos(), azimuth.sin()
    outward = torch.stack([ce * sa, se, ce * ca], dim=-1)
    forward = -outward
    right = torch.stack([ca, torch.zeros_like(ca), -sa], dim=-1)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(radius), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2] = right, down, forward
    c2w[:, :3, 3] = target + radius[:, None] * outward
    return c2w


@dataclass
class Cameras:
    """A batch of N pinhole cameras: the ``NVS_CAMERA`` type."""

    c2w: torch.Tensor          # [N,4,4] float64, OpenCV camera axes, +Y-up world
    intrinsics: torch.Tensor   # [N,4] float64: fx/W, fy/H, cx/W, cy/H
    width: int                 # nominal image size the cameras were made for
    height: int

    def __post_init__(self):
        self.c2w = torch.as_tensor(self.c2w, dtype=torch.float64).detach().cpu()
        self.intrinsics = torch.as_tensor(self.intrinsics, dtype=torch.float64).detach().cpu()
        if self.c2w.ndim == 2:
            self.c2w = self.c2w[None]
        if self.intrinsics.ndim == 1:
            self.intrinsics = self.intrinsics[None].expand(len(self.c2w), 4).clone()
        if self.c2w.shape[1:] != (4, 4) or self.intrinsics.shape != (len(self.c2w), 4):
            raise ValueError(f"cameras need c2w [N,4,4] and intrinsics [N,4], got {tuple(self.c2w.shape)} "
                             f"and {tuple(self.intrinsics.shape)}")
        self.width, self.height = int(self.width), int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"camera image size must be positive, got {self.width}x{self.height}")
        if not torch.isfinite(self.c2w).all() or not torch.isfinite(self.intrinsics).all():
            raise ValueError("camera matrices contain NaN or infinite values")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_c2w(cls, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
                 convention: str = "opencv") -> "Cameras":
        """From camera-to-world matrices ([N,4,4] or [N,3,4]) and pixel intrinsics K [N,3,3] or [3,3]."""
        return cls(_to_opencv_c2w(_homogeneous(c2w), convention), normalise_K(K, width, height), width, height)

    @classmethod
    def from_w2c(cls, w2c: torch.Tensor, K: torch.Tensor, width: int, height: int,
                 convention: str = "opencv") -> "Cameras":
        return cls.from_c2w(torch.linalg.inv(_homogeneous(w2c)), K, width, height, convention)

    @classmethod
    def from_projection(cls, P: torch.Tensor, width: int, height: int, world: str = "y_up") -> "Cameras":
        """From 3x4 projection matrices P = K [R | t] (OpenCV camera, pixels), e.g. DTU's cameras."""
        K, w2c = decompose_projection(P)
        c2w = torch.linalg.inv(w2c)
        if world == "z_up":
            c2w = torch.linalg.inv(_YUP_TO_ZUP) @ c2w
        elif world != "y_up":
            raise ValueError(f"world must be 'y_up' or 'z_up', got {world!r}")
        return cls(c2w, normalise_K(K, width, height), width, height)

    @classmethod
    def from_spherical(cls, elevation: Tensorish, azimuth: Tensorish, radius: Tensorish, fov: Tensorish,
                       width: int, height: int, target: Tensorish = (0.0, 0.0, 0.0)) -> "Cameras":
        """Cameras looking at ``target``; angles in radians, ``fov`` vertical."""
        c2w = spherical_c2w(elevation, azimuth, radius, target)
        fy = focal_from_fov(fov).expand(len(c2w))
        return cls(c2w, intrinsics_from_focal(fy, width, height), width, height)

    # ----------------------------------------------------------------- views
    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> "Cameras":
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"camera index {index} out of range for {len(self)} cameras")
            index = [index]
        return Cameras(self.c2w[index], self.intrinsics[index], self.width, self.height)

    @staticmethod
    def cat(cameras: Iterable["Cameras"]) -> "Cameras":
        cameras = list(cameras)
        if not cameras:
            raise ValueError("cannot concatenate an empty list of cameras")
        first = cameras[0]
        for i, cam in enumerate(cameras[1:], 1):
            if (cam.width, cam.height) != (first.width, first.height):
                raise ValueError(f"camera batch {i} is {cam.width}x{cam.height} but batch 0 is "
                                 f"{first.width}x{first.height}; resize them to one size first")
        return Cameras(torch.cat([c.c2w for c in cameras]), torch.cat([c.intrinsics for c in cameras]),
                       first.width, first.height)

    def with_size(self, width: int, height: int) -> "Cameras":
        """The same cameras for an image resized to ``width`` x ``height`` (no crop)."""
        return Cameras(self.c2w, self.intrinsics, width, height)

    @property
    def w2c(self) -> torch.Tensor:
        return torch.linalg.inv(self.c2w)

    @property
    def centers(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    @property
    def fov_y(self) -> torch.Tensor:
        return fov_from_focal(self.intrinsics[:, 1])

    def K(self, width: Optional[int] = None, height: Optional[int] = None) -> torch.Tensor:
        """Pixel intrinsics [N,3,3] for an image of the given size (default: nominal size)."""
        return pixel_K(self.intrinsics, width or self.width, height or self.height)

    # ----------------------------------------------------------------- conversions
    def to_c2w(self, convention: str = "opencv") -> torch.Tensor:
        return _from_opencv_c2w(self.c2w, convention)

    def to_w2c(self, convention: str = "opencv") -> torch.Tensor:
        return torch.linalg.inv(self.to_c2w(convention))

    def to_projection(self, width: Optional[int] = None, height: Optional[int] = None,
                      world: str = "y_up") -> torch.Tensor:
        c2w = _YUP_TO_ZUP @ self.c2w if world == "z_up" else self.c2w
        return self.K(width, height) @ torch.linalg.inv(c2w)[:, :3, :]

    def relative_to(self, reference: Union[int, "Cameras"] = 0) -> "Cameras":
        """Poses expressed in the frame of one reference camera (which becomes the identity)."""
        ref = self[reference] if isinstance(reference, int) else reference
        if len(ref) != 1:
            raise ValueError(f"the reference must be a single camera, got {len(ref)}")
        return Cameras(torch.linalg.inv(ref.c2w) @ self.c2w, self.intrinsics, self.width, self.height)

    def transformed(self, world_transform: torch.Tensor) -> "Cameras":
        """Apply a rigid world transform [4,4] to every camera."""
        return Cameras(torch.as_tensor(world_transform, dtype=torch.float64) @ self.c2w, self.intrinsics,
                       self.width, self.height)

    # ----------------------------------------------------------------- rays
    def rays(self, height: Optional[int] = None, width: Optional[int] = None, normalize: bool = True,
             dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        """World-space ray origins and directions [N,H,W,3] through pixel centres (+0.5)."""
        height, width = height or self.height, width or self.width
        K = self.K(width, height)
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                                torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
        fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
        cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
        cam_dirs = torch.stack([(xs - cx) / fx, (ys - cy) / fy, torch.ones_like(xs).expand_as((xs - cx) / fx)], -1)
        dirs = torch.einsum("nij,nhwj->nhwi", self.c2w[:, :3, :3], cam_dirs)
        if normalize:
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.centers[:, None, None, :].expand_as(dirs)
        return origins.to(device=device, dtype=dtype), dirs.to(device=device, dtype=dtype)

    def plucker(self, height: Optional[int] = None, width: Optional[int] = None,
                dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Plücker ray coordinates [N,H,W,6] = (o x d, d) with unit directions d."""
        origins, dirs = self.rays(height, width, normalize=True, dtype=torch.float64)
        return torch.cat([torch.linalg.cross(origins, dirs), dirs], dim=-1).to(device=device, dtype=dtype)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """JSON-ready dict: OpenCV camera axes, +Y-up world, K in pixels of the nominal size."""
        K = self.K()
        return {"width": self.width, "height": self.height, "convention": "opencv",
                "cameras": [{"c2w": c.tolist(), "K": k.tolist()} for c, k in zip(self.c2w, K)]}

    def __repr__(self) -> str:
        return f"Cameras(n={len(self)}, {self.width}x{self.height})"


# --------------------------------------------------------------------- intrinsics helpers
def intrinsics_from_focal(fy_normalised: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised intrinsics with square pixels and a centred principal point."""
    fy = _as_tensor(fy_normalised)
    fx = fy * height / width
    half = torch.full_like(fy, 0.5)
    return torch.stack([fx, fy, half, half], dim=-1)


def normalise_K(K: torch.Tensor, width: int, height: int) -> torch.Tensor:
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"pixel intrinsics must be 3x3 matrices, got shape {tuple(K.shape)}")
    K = K.reshape(-1, 3, 3)
    if torch.any(K[:, 0, 0] <= 0) or torch.any(K[:, 1, 1] <= 0):
        raise ValueError("intrinsics need positive focal lengths fx, fy")
    return torch.stack([K[:, 0, 0] / width, K[:, 1, 1] / height, K[:, 0, 2] / width, K[:, 1, 2] / height], -1)


def pixel_K(intrinsics: torch.Tensor, width: int, height: int) -> torch.Tensor:
    K = torch.zeros(intrinsics.shape[0], 3, 3, dtype=intrinsics.dtype)
    K[:, 0, 0], K[:, 1, 1] = intrinsics[:, 0] * width, intrinsics[:, 1] * height
    K[:, 0, 2], K[:, 1, 2] = intrinsics[:, 2] * width, intrinsics[:, 3] * height
    K[:, 2, 2] = 1.0
    return K


def decompose_projection(P: torch.Tensor):
    """Split 3x4 projection matrices into pixel K [N,3,3] and OpenCV w2c [N,4,4] (RQ decomposition)."""
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.shape[-2:] != (3, 4):
        raise ValueError(f"projection matrices must be 3x4, got shape {tuple(P.shape)}")
    P = P.reshape(-1, 3, 4)
    M = P[:, :, :3]
    # P is defined up to scale: make det(M) > 0 so that R is a rotation.
    P = P * torch.sign(torch.linalg.det(M))[:, None, None]
    M = P[:, :, :3]
    # RQ via QR of the row-reversed transpose.
    flip = torch.flip(torch.eye(3, dtype=torch.float64), dims=[0])
    q, r = torch.linalg.qr((flip @ M).transpose(-1, -2))
    K = flip @ r.transpose(-1, -2) @ flip
    R = flip @ q.transpose(-1, -2)
    signs = torch.diag_embed(torch.sign(torch.diagonal(K, dim1=-2, dim2=-1)))
    K, R = K @ signs, signs @ R
    t = torch.linalg.solve(K, P[:, :, 3:])
    scale = K[:, 2:3, 2:3]
    K = K / scale
    skew = K[:, 0, 1].abs() / K[:, 0, 0]
    if torch.any(skew > 1e-3):
        raise ValueError(f"projection matrices with pixel skew are not supported (skew/fx up to {skew.max():.2g})")
    K[:, 0, 1] = 0.0
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(P), 1, 1)
    w2c[:, :3, :3], w2c[:, :3, 3:] = R, t
    return K, w2c


def _homogeneous(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.shape[-2:] == (3, 4):
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(*m.shape[:-2], 1, 4)
        m = torch.cat([m, bottom], dim=-2)
    if m.shape[-2:] != (4, 4):
        raise ValueError(f"pose matrices must be 4x4 or 3x4, got shape {tuple(m.shape)}")
    m = m.reshape(-1, 4, 4)
    R = m[:, :3, :3]
    if not torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-4) \
            or torch.any(torch.linalg.det(R) < 0):
        raise ValueError("pose matrices must have a rotation (orthonormal, det +1) in their top-left 3x3")
    return m


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown camera convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def _to_opencv_c2w(c2w: torch.Tensor, convention: str) -> torch.Tensor:
    _check_convention(convention)
    if convention == "opencv":
        return c2w
    c2w = c2w @ _OPENCV_TO_OPENGL_AXES
    return torch.linalg.inv(_YUP_TO_ZUP) @ c2w if convention == "blender" else c2w


def _from_opencv_c2w(c2w: torch.Tensor, convention: str) -> torch.Tensor:
    _check_convention(convention)
    if convention == "opencv":
        return c2w.clone()
    out = c2w @ _OPENCV_TO_OPENGL_AXES
    return _YUP_TO_ZUP @ out if convention == "blender" else out


# --------------------------------------------------------------------- builders
def orbit(count: int, elevation: float, azimuth_start: float, azimuth_sweep: float, radius: float, fov: float,
          width: int, height: int, target: Tensorish = (0.0, 0.0, 0.0)) -> Cameras:
    """``count`` cameras on a circle of constant elevation (radians).

    A full turn (|sweep| = 2 pi) is closed without repeating the first view; any other sweep
    includes both ends.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    full_turn = math.isclose(abs(azimuth_sweep), 2 * math.pi, abs_tol=1e-9)
    steps = count if full_turn or count == 1 else count - 1
    azimuths = azimuth_start + azimuth_sweep * torch.arange(count, dtype=torch.float64) / steps
    return Cameras.from_spherical(elevation, azimuths, radius, fov, width, height, target)


def spiral(count: int, elevation_start: float, elevation_end: float, turns: float, radius: float, fov: float,
           width: int, height: int, azimuth_start: float = 0.0, target: Tensorish = (0.0, 0.0, 0.0)) -> Cameras:
    """Cameras climbing from one elevation to another while turning ``turns`` times (radians)."""
    if count < 2:
        raise ValueError(f"a spiral needs count >= 2, got {count}")
    u = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
    elevations = elevation_start + (elevation_end - elevation_start) * u
    azimuths = azimuth_start + 2 * math.pi * turns * u
    return Cameras.from_spherical(elevations, azimuths, radius, fov, width, height, target)


def interpolate(keyframes: Cameras, count: int) -> Cameras:
    """A smooth trajectory through key cameras: slerped rotations, linear centres and intrinsics."""
    if len(keyframes) < 2:
        raise ValueError("a trajectory needs at least 2 key cameras")
    if count < 2:
        raise ValueError(f"count must be >= 2, got {count}")
    segments = len(keyframes) - 1
    positions = torch.linspace(0.0, float(segments), count, dtype=torch.float64)
    index = positions.floor().long().clamp(max=segments - 1)
    frac = positions - index
    quats = Quaternion.from_matrix(keyframes.c2w[:, :3, :3]).data
    # Keep consecutive key quaternions in one hemisphere so slerp takes the short way.
    for i in range(1, len(quats)):
        if torch.dot(quats[i], quats[i - 1]) < 0:
            quats[i] = -quats[i]
    q0, q1 = Quaternion(quats[index]), Quaternion(quats[index + 1])
    rot = _slerp(q0, q1, frac).matrix()
    centers = torch.lerp(keyframes.centers[index], keyframes.centers[index + 1], frac[:, None])
    intr = torch.lerp(keyframes.intrinsics[index], keyframes.intrinsics[index + 1], frac[:, None])
    c2w = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = rot, centers
    return Cameras(c2w, intr, keyframes.width, keyframes.height)


def _slerp(q0: Quaternion, q1: Quaternion, t: torch.Tensor) -> Quaternion:
    # kornia's Quaternion.slerp takes one scalar t; a batch of t values is done per element.
    return Quaternion(torch.stack([q0[i].slerp(q1[i], float(t[i])).data.reshape(4) for i in range(len(t))]))


# --------------------------------------------------------------------- JSON / host formats
def cameras_from_dict(data, width: Optional[int] = None, height: Optional[int] = None) -> Cameras:
    """Parse the JSON written by :meth:`Cameras.to_dict` and common variants.

    Accepted: ``{"width", "height", "convention"?, "cameras": [entry, ...]}`` where an entry holds one
    of ``c2w`` (4x4 or 3x4), ``w2c`` or ``P`` (3x4 projection, pixels, OpenCV camera) and, unless
    ``P`` is given, ``K`` (3x3 pixels) or ``fov`` (vertical degrees); ``convention`` is one of
    opencv/opengl/blender (camera axes; blender also means a Z-up world). A bare list of entries or
    of 3x4 projection matrices is accepted too (then width/height must come from the arguments).
    """
    if isinstance(data, list):
        data = {"cameras": data}
    if not isinstance(data, dict):
        raise ValueError(f"camera JSON must be an object or a list, got {type(data).__name__}")
    width, height = data.get("width", width), data.get("height", height)
    if width is None or height is None:
        raise ValueError("camera JSON needs 'width' and 'height' (the image size the intrinsics refer to)")
    convention = data.get("convention", "opencv")
    _check_convention(convention)
    entries = data.get("cameras", data.get("projections"))
    if not isinstance(entries, list) or not entries:
        raise ValueError("camera JSON needs a non-empty 'cameras' list")
    cams = []
    for i, entry in enumerate(entries):
        try:
            cams.append(_camera_from_entry(entry, int(width), int(height), convention))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(f"camera {i}: {exc}") from None
    return Cameras.cat(cams)


def _camera_from_entry(entry, width: int, height: int, convention: str) -> Cameras:
    if isinstance(entry, list):
        entry = {"P": entry}
    if not isinstance(entry, dict):
        raise ValueError("each camera must be an object with c2w, w2c or P")
    if "P" in entry:
        world = "z_up" if convention == "blender" else "y_up"
        return Cameras.from_projection(parse_matrix(entry["P"], "P", (3, 4)), width, height, world=world)
    if "K" in entry:
        K = parse_matrix(entry["K"], "K", (3, 3))
    elif "fov" in entry:
        fy = focal_from_fov(math.radians(float(entry["fov"])))
        K = pixel_K(intrinsics_from_focal(fy, width, height), width, height)
    else:
        raise ValueError("needs intrinsics: 'K' (3x3 pixels) or 'fov' (vertical degrees)")
    if "c2w" in entry:
        return Cameras.from_c2w(parse_matrix(entry["c2w"], "c2w"), K, width, height, convention)
    if "w2c" in entry:
        return Cameras.from_w2c(parse_matrix(entry["w2c"], "w2c"), K, width, height, convention)
    raise ValueError("needs a pose: 'c2w', 'w2c' or 'P'")


def parse_matrix(value, name: str, shape: Optional[tuple] = None) -> torch.Tensor:
    try:
        m = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"'{name}' must be a matrix of numbers") from None
    allowed = [shape] if shape else [(4, 4), (3, 4)]
    if tuple(m.shape) not in allowed:
        raise ValueError(f"'{name}' must be {' or '.join('x'.join(map(str, s)) for s in allowed)}, "
                         f"got shape {'x'.join(map(str, m.shape)) or 'scalar'}")
    return m


def cameras_from_load3d(camera_info: dict, fov: float, width: int, height: int) -> Cameras:
    """ComfyUI's ``LOAD3D_CAMERA`` (three.js: position, target, zoom; +Y-up world) -> Cameras.

    three.js divides the tangent of the half field of view by ``zoom``; ``fov`` is the viewer's
    vertical field of view in radians, which the camera dict does not carry.
    """
    try:
        position = [float(camera_info["position"][k]) for k in "xyz"]
        target = [float(camera_info["target"][k]) for k in "xyz"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("LOAD3D_CAMERA must have 'position' and 'target' with x, y, z numbers") from None
    if str(camera_info.get("cameraType", "perspective")).lower() != "perspective":
        raise ValueError(f"only perspective Load3D cameras can be converted, got {camera_info.get('cameraType')!r}")
    zoom = float(camera_info.get("zoom", 1) or 1)
    if zoom <= 0:
        raise ValueError(f"LOAD3D_CAMERA zoom must be > 0, got {zoom}")
    fy = focal_from_fov(fov) * zoom
    c2w = look_at(torch.tensor(position), torch.tensor(target))
    return Cameras(c2w, intrinsics_from_focal(fy, width, height), width, height)
