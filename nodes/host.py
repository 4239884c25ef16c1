"""The one place that talks to ComfyUI (ARCHITECTURE.md section 1).

Every ComfyUI import is lazy and optional: without the host, plain fallbacks apply (tqdm progress,
CUDA if available else CPU, model folders under ``$NVS_MODELS_DIR`` or ``./models/nvs``), so node
classes import and run in CI. Version-sensitive host APIs stay in this module.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import List

import torch

from ..nvs_core.progress import Progress, ProgressFactory, TqdmProgress

log = logging.getLogger("ComfyUI-NVS")

METHOD_FOLDERS = ("viewneti", "nvs_adapter", "genvs", "vivid", "realfusion", "lpips")
# Weight files only: sidecar .json configs are found next to their .safetensors, not listed.
MODEL_EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pkl"}


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def comfy_available() -> bool:
    return _optional("comfy.model_management") is not None and _optional("folder_paths") is not None


# ------------------------------------------------------------------ device and dtype
def compute_device() -> torch.device:
    mm = _optional("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE/MASK outputs live (CPU unless ComfyUI runs with --gpu-only)."""
    mm = _optional("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


DTYPE_CHOICES = ["auto", "fp32", "fp16", "bf16"]


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (bf16 where supported is the user's choice), fp32 on CPU."""
    if choice == "fp32":
        return torch.float32
    if choice == "fp16":
        return torch.float16
    if choice == "bf16":
        return torch.bfloat16
    if choice != "auto":
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {choice!r}")
    mm = _optional("comfy.model_management")
    if mm is not None:
        return torch.float16 if mm.should_use_fp16(device) else torch.float32
    return torch.float16 if device.type == "cuda" else torch.float32


def free_memory() -> None:
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ progress and interrupt
def _comfy_interrupt_check() -> bool:
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's own exception
    return False


def progress_factory() -> ProgressFactory:
    """Progress reporters for nvs_core loops: ComfyUI's ProgressBar inside the host, tqdm outside."""
    utils = _optional("comfy.utils")
    if utils is None or _optional("comfy.model_management") is None:
        return lambda total, desc="": TqdmProgress(total, desc)

    def make(total: int, desc: str = "") -> Progress:
        bar = utils.ProgressBar(total)
        return Progress(total, desc, on_update=lambda done, tot: bar.update_absolute(done, tot),
                        should_stop=_comfy_interrupt_check)

    return make


def preview_sender(total: int):
    """``send(done, image)`` showing ``image`` ([H, W, 3] float 0..1) as the node's progress preview in
    ComfyUI (``ProgressBar`` preview); None outside the host."""
    utils = _optional("comfy.utils")
    if utils is None or _optional("comfy.model_management") is None:
        return None
    bar = utils.ProgressBar(total)

    def send(done: int, image: torch.Tensor) -> None:
        from PIL import Image

        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        bar.update_absolute(done, total, ("JPEG", Image.fromarray(pixels), 512))

    return send


# ------------------------------------------------------------------ model folders
def _fallback_models_root() -> str:
    return os.environ.get("NVS_MODELS_DIR", os.path.join(os.getcwd(), "models", "nvs"))


def folder_key(method: str) -> str:
    return f"nvs_{method}"


def register_model_folders() -> None:
    """Register ``models/nvs/<method>/`` with ComfyUI, keeping paths users added in extra_model_paths."""
    folder_paths = _optional("folder_paths")
    if folder_paths is None:
        return
    for method in METHOD_FOLDERS:
        key = folder_key(method)
        default = os.path.join(folder_paths.models_dir, "nvs", method)
        paths, _ = folder_paths.folder_names_and_paths.get(key, ([], set()))
        paths = [default] + [p for p in paths if p != default]
        folder_paths.folder_names_and_paths[key] = (paths, set(MODEL_EXTENSIONS))


def model_folders(method: str) -> List[str]:
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        try:
            return list(folder_paths.get_folder_paths(folder_key(method)))
        except KeyError:
            pass
    return [os.path.join(_fallback_models_root(), method)]


def list_model_files(method: str) -> List[str]:
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        try:
            return sorted(folder_paths.get_filename_list(folder_key(method)))
        except KeyError:
            pass
    found = []
    for root in model_folders(method):
        for dirpath, _, files in os.walk(root):
            for name in files:
                if os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS:
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def model_path(method: str, name: str) -> str:
    """Absolute path of a model file chosen in a loader, or a clear error naming the folders."""
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    for root in model_folders(method):
        candidate = os.path.join(root, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"model file {name!r} not found in {', '.join(model_folders(method))} "
                            f"(put {method} models in models/nvs/{method}/)")


def output_directory() -> str:
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_output_directory()
    return os.environ.get("NVS_OUTPUT_DIR", os.path.join(os.getcwd(), "output"))


def input_directory() -> str:
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_input_directory()
    return os.environ.get("NVS_INPUT_DIR", os.path.join(os.getcwd(), "input"))


# ------------------------------------------------------------------ embeddings, output files, 3D types
def embeddings_directory() -> str:
    """The first folder ComfyUI searches for ``embedding:<name>`` (``models/embeddings``)."""
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        try:
            folders = folder_paths.get_folder_paths("embeddings")
            if folders:
                return folders[0]
        except KeyError:
            pass
    return os.environ.get("NVS_EMBEDDINGS_DIR", os.path.join(os.getcwd(), "models", "embeddings"))


def output_file_path(prefix: str, extension: str):
    """(absolute path, path relative to the output folder) of a new ``<prefix>_<counter:05>_.<ext>`` output
    file, numbered like ComfyUI's own savers; the relative path is what ``Preview3D`` takes."""
    output = output_directory()
    folder_paths = _optional("folder_paths")
    if folder_paths is not None:
        full_folder, filename, _, subfolder, _ = folder_paths.get_save_image_path(prefix, output)
    else:
        subfolder, filename = os.path.split(os.path.normpath(prefix))
        full_folder = os.path.join(output, subfolder)
        if os.path.commonpath([os.path.abspath(output), os.path.abspath(full_folder)]) != os.path.abspath(output):
            raise ValueError(f"filename_prefix {prefix!r} points outside the output folder")
    os.makedirs(full_folder, exist_ok=True)
    counter = 1
    while os.path.exists(os.path.join(full_folder, f"{filename}_{counter:05}_.{extension}")):
        counter += 1
    name = f"{filename}_{counter:05}_.{extension}"
    return os.path.join(full_folder, name), (f"{subfolder}/{name}" if subfolder else name)


class _PlainMesh:
    """Stand-in for ComfyUI's ``MESH`` (vertices [B, N, 3], faces [B, M, 3]) where the host has none."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor):
        self.vertices = vertices
        self.faces = faces


def make_mesh(vertices: torch.Tensor, faces: torch.Tensor):
    """A core ``MESH`` (``comfy_api.latest.Types.MESH``, positions + faces only in 0.8.0) from one mesh;
    a plain object with the same fields when the host API is missing."""
    vertices = vertices.float().reshape(1, -1, 3)
    faces = faces.long().reshape(1, -1, 3)
    latest = _optional("comfy_api.latest")
    mesh_type = getattr(getattr(latest, "Types", None), "MESH", None) if latest is not None else None
    return (mesh_type or _PlainMesh)(vertices, faces)
