"""``NVS_MULTIVIEW``: images + cameras (+ masks, depth, names), and a plain-folder reader/writer.

Folder layouts read by :func:`load_folder`:

- our ``cameras.json``: ``{"width", "height", "convention": "opencv"|"opengl"|"blender",
  "cameras": [{"file"?, "c2w" 4x4 | "w2c" 4x4 | "P" 3x4, "K" 3x3 pixels (not needed with P)}]}``;
  without ``file`` entries the folder's images are matched in (natural) sorted order. ``P`` is
  K [R|t] with OpenCV camera axes; with convention "blender" its world is taken as Z-up.
- NeRF-synthetic / instant-ngp ``transforms.json``: ``camera_angle_x`` (+ optional ``camera_angle_y``)
  or ``fl_x, fl_y, cx, cy, w, h`` (top level or per frame), ``frames[{file_path, transform_matrix}]``
  with OpenGL camera axes in a Blender Z-up world; ``file_path`` may omit the extension.

A cameras file's ``width``/``height`` (``w``/``h``) is its cameras' nominal size; images of another size
are taken as resized (not cropped) copies, which normalised intrinsics represent exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cameras import Cameras, cameras_from_dict, parse_matrix

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAMERA_FILES = ("cameras.json", "transforms.json", "transforms_train.json")
PathLike = Union[str, Path]


@dataclass
class MultiView:
    """N views of one scene: ``images`` [N,H,W,3] float 0..1 (ComfyUI IMAGE) and their cameras."""

    images: torch.Tensor
    cameras: Cameras
    masks: Optional[torch.Tensor] = None   # [N,H,W] coverage 0..1
    depth: Optional[torch.Tensor] = None   # [N,H,W] z-depth, 0 = unknown
    names: Optional[List[str]] = None

    def __post_init__(self):
        self.images = torch.as_tensor(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or not self.images.is_floating_point():
            raise ValueError(f"MultiView.images must be a float tensor [N,H,W,3] (values 0..1), got "
                             f"{self.images.dtype} {list(self.images.shape)}")
        n, h, w = self.images.shape[:3]
        if not isinstance(self.cameras, Cameras):
            raise ValueError(f"MultiView.cameras must be a Cameras object, got {type(self.cameras).__name__}")
        if len(self.cameras) != n:
            raise ValueError(f"MultiView.cameras has {len(self.cameras)} cameras but images has {n} views; "
                             "expected one camera per image")
        if (self.cameras.width, self.cameras.height) != (w, h):
            self.cameras = self.cameras.with_size(w, h)  # exact for a resize: intrinsics are normalised
        for field in ("masks", "depth"):
            value = getattr(self, field)
            if value is None:
                continue
            value = torch.as_tensor(value)
            if value.ndim == 4 and value.shape[-1] == 1:
                value = value[..., 0]
            if tuple(value.shape) != (n, h, w):
                raise ValueError(f"MultiView.{field} must be [N,H,W] = {[n, h, w]} to match images, "
                                 f"got {list(value.shape)}")
            setattr(self, field, value.to(device=self.images.device, dtype=self.images.dtype))
        if self.names is not None:
            self.names = [str(x) for x in self.names]
            if len(self.names) != n:
                raise ValueError(f"MultiView.names must have one name per image ({n}), got {len(self.names)}")

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> "MultiView":
        n = len(self)
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"view index {index} out of range for {n} views")
            idx = [index % n]
        elif isinstance(index, slice):
            idx = list(range(n))[index]
        else:
            index = torch.as_tensor(index).reshape(-1)
            if index.dtype == torch.bool:
                index = index.nonzero().reshape(-1)
            if len(index) and not (-n <= int(index.min()) and int(index.max()) < n):
                raise IndexError(f"view indices {index.tolist()} out of range for {n} views")
            idx = [int(i) % n for i in index.tolist()]
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return MultiView(self.images[idx], self.cameras[idx], pick(self.masks), pick(self.depth),
                         None if self.names is None else [self.names[i] for i in idx])

    @staticmethod
    def cat(views: Sequence["MultiView"]) -> "MultiView":
        """Concatenate; missing masks become 1 (all foreground), missing depth 0 (unknown)."""
        views = list(views)
        if not views:
            raise ValueError("cannot concatenate an empty list of multi-views")
        for i, v in enumerate(views[1:], 1):
            if (v.width, v.height) != (views[0].width, views[0].height):
                raise ValueError(f"multi-view {i} is {v.width}x{v.height} but multi-view 0 is "
                                 f"{views[0].width}x{views[0].height}; resize them to one size first")

        def merged(field, fill):
            if all(getattr(v, field) is None for v in views):
                return None
            return torch.cat([getattr(v, field) if getattr(v, field) is not None
                              else torch.full(v.images.shape[:3], fill, dtype=v.images.dtype) for v in views])

        names = None
        if any(v.names is not None for v in views):
            names = [name for k, v in enumerate(views)
                     for name in (v.names or [f"part{k}_view_{i:03d}" for i in range(len(v))])]
        return MultiView(torch.cat([v.images for v in views]), Cameras.cat([v.cameras for v in views]),
                         merged("masks", 1.0), merged("depth", 0.0), names)

    def to_dict(self) -> dict:
        """A JSON-ready summary (no pixel data)."""
        return {"count": len(self), "width": self.width, "height": self.height, "names": self.names,
                "has_masks": self.masks is not None, "has_depth": self.depth is not None,
                "cameras": self.cameras.to_dict()}

    def __repr__(self) -> str:
        extras = "".join(f", {f}" for f in ("masks", "depth") if getattr(self, f) is not None)
        return f"MultiView(n={len(self)}, {self.width}x{self.height}{extras})"


# --------------------------------------------------------------------- reading
def load_folder(folder: PathLike, cameras_file: Optional[PathLike] = None,
                background: Union[str, Sequence[float]] = "white") -> MultiView:
    """Read a folder of images and a cameras file (see the module docstring) into a :class:`MultiView`.

    Images with alpha give soft ``masks`` (the alpha) and are composited on ``background``
    ("white", "black" or an (r, g, b) in 0..1).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"multi-view folder not found: {folder}")
    path = _find_cameras_file(folder, cameras_file)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("frames"), list):
        files = [_frame_file(path, i, fr) for i, fr in enumerate(data["frames"])]
        build = _transforms_cameras
    elif isinstance(data, dict) and isinstance(data.get("cameras"), list):
        files = _listed_files(path, folder, data["cameras"])
        build = _our_cameras
    else:
        raise ValueError(f"{path}: expected our cameras JSON (a 'cameras' list) or a NeRF transforms.json "
                         f"(a 'frames' list), found {list(data) if isinstance(data, dict) else type(data).__name__}")
    if not files:
        raise ValueError(f"{path}: lists no cameras")
    bg = _background(background)
    images, alphas = [], []
    for f in files:
        rgb, alpha = _read_image(f)
        if images and rgb.shape != images[0].shape:
            raise ValueError(f"{f} is {rgb.shape[1]}x{rgb.shape[0]} but {files[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; all images must share one size")
        if alpha is not None:
            rgb = rgb * alpha[..., None] + bg * (1 - alpha[..., None])
        images.append(rgb)
        alphas.append(alpha)
    h, w = images[0].shape[:2]
    cameras = build(path, data, w, h)
    masks = None
    if any(a is not None for a in alphas):
        masks = torch.stack([a if a is not None else torch.ones(h, w) for a in alphas])
    return MultiView(torch.stack(images), cameras.with_size(w, h), masks=masks, names=[f.stem for f in files])


def _find_cameras_file(folder: Path, cameras_file: Optional[PathLike]) -> Path:
    if cameras_file is not None:
        path = Path(cameras_file)
        path = folder / path if (folder / path).is_file() else path
        if not path.is_file():
            raise FileNotFoundError(f"cameras file not found: {path}")
        return path
    for name in CAMERA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no cameras file in {folder}: expected one of {', '.join(CAMERA_FILES)} "
                            "(or pass cameras_file)")


def _natural_key(path: Path):
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", path.name)]


def _listed_files(path: Path, folder: Path, entries: list) -> List[Path]:
    """Image files of our JSON: its ``file`` entries (relative to the folder), else the sorted folder."""
    has_file = [isinstance(e, dict) and "file" in e for e in entries]
    if all(has_file):
        files = [folder / e["file"] for e in entries]
        for i, f in enumerate(files):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: camera {i} refers to {f}, which does not exist")
        return files
    if any(has_file):
        raise ValueError(f"{path}: either every camera entry names its 'file' or none does")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
    if len(files) != len(entries):
        raise ValueError(f"{path} lists {len(entries)} cameras without 'file' entries but {folder} holds "
                         f"{len(files)} images; they are matched in sorted order, so the counts must agree")
    return files


def _frame_file(path: Path, i: int, frame) -> Path:
    if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
        raise ValueError(f"{path}: frame {i} needs 'file_path' and 'transform_matrix'")
    base = path.parent / frame["file_path"]
    for candidate in [base] + [base.with_name(base.name + ext) for ext in IMAGE_EXTENSIONS]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: frame {i} refers to {base} (with or without an image extension), "
                            "which does not exist")


def _our_cameras(path: Path, data: dict, img_w: int, img_h: int) -> Cameras:
    try:
        return cameras_from_dict(data, img_w, img_h)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _transforms_cameras(path: Path, data: dict, img_w: int, img_h: int) -> Cameras:
    cams = []
    for i, frame in enumerate(data["frames"]):
        where = f"{path}: frame {i}"
        get = lambda key, default=None: frame.get(key, data.get(key, default))  # noqa: E731 (per-frame overrides)
        w, h = int(get("w", img_w)), int(get("h", img_h))
        if get("fl_x") is not None:
            fx = float(get("fl_x"))
            fy = float(get("fl_y", fx))
        elif get("camera_angle_x") is not None:
            fx = 0.5 * w / math.tan(0.5 * float(get("camera_angle_x")))
            fy = 0.5 * h / math.tan(0.5 * float(get("camera_angle_y"))) if get("camera_angle_y") else fx
        else:
            raise ValueError(f"{where} has no intrinsics: expected 'camera_angle_x' or 'fl_x' (top level or per frame)")
        K = torch.tensor([[fx, 0, float(get("cx", w / 2))], [0, fy, float(get("cy", h / 2))], [0, 0, 1]],
                         dtype=torch.float64)
        try:
            c2w = parse_matrix(frame["transform_matrix"], "transform_matrix")
            cams.append(Cameras.from_c2w(c2w, K, w, h, convention="blender").with_size(img_w, img_h))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    return Cameras.cat(cams)


def _background(background) -> torch.Tensor:
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
    if isinstance(background, str):
        if background not in named:
            raise ValueError(f"background must be 'white', 'black' or an (r, g, b) triple, got {background!r}")
        background = named[background]
    return torch.as_tensor(background, dtype=torch.float32).reshape(3)


def _read_image(path: Path):
    """rgb [H,W,3] float32 0..1 and alpha [H,W] (None without an alpha channel)."""
    try:
        with Image.open(path) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    t = torch.from_numpy(arr.copy())
    return (t[..., :3], t[..., 3]) if has_alpha else (t, None)


# --------------------------------------------------------------------- SRN layout
def load_srn(instance_dir: PathLike, views: Optional[Sequence[str]] = None, intrinsics: str = "first",
             k_image_size: Optional[Sequence[int]] = None,
             background: Union[str, Sequence[float], None] = "white") -> MultiView:
    """One SRN instance (``cars_train/<id>/``: ``rgb/<view>.png``, ``pose/<view>.txt`` with the 16 numbers
    of an OpenCV camera-to-world matrix in a +Z-up world, ``intrinsics/<view>.txt`` with a 3x3 K, or
    the original instance-level ``intrinsics.txt``) into a :class:`MultiView`.

    ``views``: image names in the order wanted (with or without extension; repeats allowed, as the
    GeNVS loader produces); default all images, sorted. ``intrinsics="first"`` reproduces the published
    GeNVS loader, which reads the first listed view's K and uses it for every view; ``"per_view"``
    reads each view's own file. ``k_image_size`` (W, H) is the image size K refers to; by default
    512 x 512 for per-view K files (the published loader divides them by 8 for its 64-px render) and the
    size on the fourth line of ``intrinsics.txt`` (else twice its principal point). ``background=None`` drops
    alpha as the published loader does; otherwise alpha is composited on that colour.
    """
    root = Path(instance_dir)
    rgb_dir = root / "rgb"
    if not rgb_dir.is_dir() or not (root / "pose").is_dir():
        raise FileNotFoundError(f"{root}: expected an SRN instance folder with rgb/ and pose/ (and intrinsics/ "
                                "or intrinsics.txt)")
    if intrinsics not in ("first", "per_view"):
        raise ValueError(f"intrinsics must be 'first' or 'per_view', got {intrinsics!r}")
    all_files = sorted((p for p in rgb_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
    if views is None:
        files = all_files
    else:
        by_stem = {p.stem: p for p in all_files}
        files = []
        for v in views:
            stem = Path(str(v)).stem
            if stem not in by_stem:
                raise FileNotFoundError(f"{rgb_dir}: no image for view {v!r}")
            files.append(by_stem[stem])
    if not files:
        raise ValueError(f"{rgb_dir}: no images")
    bg = None if background is None else _background(background)
    images = []
    for f in files:
        rgb, alpha = _read_image(f)
        if alpha is not None and bg is not None:
            rgb = rgb * alpha[..., None] + bg * (1 - alpha[..., None])
        if images and rgb.shape != images[0].shape:
            raise ValueError(f"{f} is {rgb.shape[1]}x{rgb.shape[0]} but {files[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; all images must share one size")
        images.append(rgb)
    h, w = images[0].shape[:2]
    Ks = [_srn_K(root, f.stem) for f in (files[:1] * len(files) if intrinsics == "first" else files)]
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    cams = []
    for f, (K, k_size) in zip(files, Ks):
        pose = _read_numbers(root / "pose" / f"{f.stem}.txt", 16).reshape(4, 4)
        kw, kh = k_image_size if k_image_size is not None else k_size
        try:
            # OpenCV camera in a Z-up world = OpenGL camera axes (y, z flipped) in a Blender-style world
            cams.append(Cameras.from_c2w(pose @ flip, K, int(kw), int(kh), convention="blender"))
        except ValueError as e:
            raise ValueError(f"{root / 'pose' / (f.stem + '.txt')}: {e}") from None
    cameras = Cameras.cat([c.with_size(int(cams[0].width), int(cams[0].height)) for c in cams])
    return MultiView(torch.stack(images), cameras.with_size(w, h), names=[f.stem for f in files])


def _read_numbers(path: Path, count: int) -> torch.Tensor:
    try:
        values = [float(x) for x in path.read_text().split()]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read {count} numbers ({e})") from None
    if len(values) < count:
        raise ValueError(f"{path}: expected {count} numbers, found {len(values)}")
    return torch.tensor(values[:count], dtype=torch.float64)


def _srn_K(root: Path, stem: str):
    """(K, (W, H) it refers to) of one SRN view."""
    per_view = root / "intrinsics" / f"{stem}.txt"
    if per_view.is_file():
        return _read_numbers(per_view, 9).reshape(3, 3), (512, 512)
    shared = root / "intrinsics.txt"
    if shared.is_file():  # original SRN: "f cx cy 0" / "0 0 0" / "1" / "H W"
        _read_numbers(shared, 3)                           # validates (all numbers, at least three)
        values = [float(x) for x in shared.read_text().split()]
        f, cx, cy = values[:3]
        size = (int(values[9]), int(values[8])) if len(values) >= 10 else (round(2 * cx), round(2 * cy))
        return torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1]], dtype=torch.float64), size
    raise FileNotFoundError(f"{root}: no intrinsics/{stem}.txt and no intrinsics.txt")


# --------------------------------------------------------------------- writing
def save_folder(multiview: MultiView, folder: PathLike) -> Path:
    """Write ``<name>.png`` per view (RGBA with the mask as alpha when masks exist) and cameras.json.

    Depth is not written. Names that are missing, repeated or not file-safe become ``view_###``.
    Returns the path of cameras.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = multiview.names
    if names is None or len(set(names)) != len(names) or not all(re.fullmatch(r"\w[\w.\-]*", n) for n in names):
        names = [f"view_{i:03d}" for i in range(len(multiview))]
    to_u8 = lambda x: (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    for i, name in enumerate(names):
        rgb = multiview.images[i]
        if multiview.masks is not None:
            rgb = torch.cat([rgb, multiview.masks[i][..., None]], -1)
        Image.fromarray(to_u8(rgb)).save(folder / f"{name}.png")
    data = multiview.cameras.to_dict()
    for entry, name in zip(data["cameras"], names):
        entry["file"] = f"{name}.png"
    path = folder / "cameras.json"
    path.write_text(json.dumps(data, indent=1))
    return path
