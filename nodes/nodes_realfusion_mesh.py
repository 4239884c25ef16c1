"""RealFusion mesh export node: ``NVS_FIELD`` -> GLB (and OBJ) in the output folder, a path for ComfyUI's
Preview3D and a core MESH (:mod:`nvs_core.realfusion.mesh`)."""
from __future__ import annotations

import math
import os

import torch

from ..nvs_core.realfusion import RealFusionField
from ..nvs_core.realfusion import mesh as field_mesh

from . import host
from .common import float_input, int_input

CATEGORY = "NVS/RealFusion"
FIELD = "NVS_FIELD"
FORMATS = ["glb", "obj", "glb+obj"]


class NVSFieldExportMesh:
    DESCRIPTION = ("Export a RealFusion field as a mesh: density on a resolution^3 grid, marching cubes at "
                   "min(mean density, 10) as published, trimesh cleanup, colours from the field's albedo. "
                   "'textured' unwraps UVs with xatlas and bakes the albedo into a texture (the export the original "
                   "intended but never ran); otherwise vertex colours. Files go to the output folder; mesh_path feeds "
                   "the core Preview 3D node. A field with no surface raises an error instead of writing an empty "
                   "mesh.")
    CATEGORY = CATEGORY
    FUNCTION = "export"
    RETURN_TYPES = ("STRING", "MESH", "STRING")
    RETURN_NAMES = ("mesh_path", "mesh", "summary")
    OUTPUT_TOOLTIPS = ("The GLB (or OBJ) path relative to the output folder, for Preview 3D's model_file.",
                       "The geometry as a core MESH (positions and faces only) for core 3D nodes such as SaveGLB.",
                       "Vertex and face counts, the density level, the colour mode, the files and the time taken.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "field": (FIELD, {"tooltip": "A fitted RealFusion field (NVS RealFusion Reconstruct or NVS Field Loader)."}),
            "resolution": int_input(256, 16, 1024, "Grid cells per axis for marching cubes (published 256); memory "
                                    "and time grow with its cube."),
            "format": (FORMATS, {"default": "glb", "tooltip": "glb: binary glTF (Preview 3D, Blender); obj: OBJ "
                       "(+ MTL + PNG when textured); glb+obj: both."}),
            "textured": ("BOOLEAN", {"default": False, "tooltip": "UV-unwrap with xatlas and bake the albedo into a "
                         "texture (needs the xatlas package); off: per-vertex colours."}),
            "filename_prefix": ("STRING", {"default": "nvs/realfusion_mesh", "tooltip": "Output file prefix inside "
                                "ComfyUI's output folder; files are numbered <prefix>_00001_.glb."}),
        }, "optional": {
            "threshold": float_input(0.0, 0.0, 100000.0, 0.1, "Density level of the surface; 0 uses the published "
                                     "min(mean density, 10)."),
            "texture_size": int_input(2048, 64, 8192, "Texture width and height in texels (published 2048)."),
            "min_component": float_input(0.0, 0.0, 1.0, 0.001, "Drop disconnected pieces with fewer faces than this "
                                         "fraction of all faces (floaters); 0 keeps everything."),
            "frame": (list(field_mesh.FRAMES), {"default": "nvs", "tooltip": "nvs: the pack's +Y-up world, which "
                      "glTF and Preview 3D share (the photo faces the viewer from the front); realfusion: the "
                      "published coordinates (x mirrored)."}),
        }}

    def export(self, field, resolution, format, textured, filename_prefix, threshold=0.0, texture_size=2048,
               min_component=0.0, frame="nvs"):
        if not isinstance(field, RealFusionField):
            raise ValueError(f"field: expected an NVS_FIELD (a RealFusion field from NVS RealFusion Reconstruct or "
                             f"NVS Field Loader), got {type(field).__name__}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if frame not in field_mesh.FRAMES:
            raise ValueError(f"frame must be one of {list(field_mesh.FRAMES)}, got {frame!r}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be 0 (published rule) or a positive density, got {threshold}")
        if textured and not field_mesh.xatlas_available():
            raise ValueError("textured: the textured export needs the 'xatlas' package (pip install xatlas); turn "
                             "'textured' off for vertex colours")
        prefix = str(filename_prefix).strip() or "nvs/realfusion_mesh"
        slabs = int(resolution)
        reporter = host.progress_factory()(slabs, "mesh export")
        state = {"done": 0}

        def advance(done, total):
            reporter.update(done - state["done"])
            state["done"] = done

        try:
            with torch.inference_mode(False), torch.no_grad():
                mesh = field_mesh.extract_mesh(
                    field, int(resolution), threshold=float(threshold) if threshold > 0 else None,
                    textured=bool(textured), texture_size=int(texture_size), frame=frame,
                    min_component_fraction=float(min_component), progress=advance, interrupt=reporter.check)
        except field_mesh.EmptyFieldError as e:
            raise ValueError(f"field: {e}") from None
        finally:
            reporter.close()
        written = []
        path = relative = None
        for kind in (["glb"] if format == "glb" else ["obj"] if format == "obj" else ["glb", "obj"]):
            target, rel = host.output_file_path(prefix, kind)
            (field_mesh.write_glb if kind == "glb" else field_mesh.write_obj)(mesh, target)
            written.append(rel)
            if path is None:
                path, relative = target, rel
        core_mesh = host.make_mesh(torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces))
        summary = f"{field_mesh.mesh_summary(mesh)}; wrote {', '.join(written)} (frame {frame})"
        return {"ui": {"text": [summary]}, "result": (relative, core_mesh, summary)}


def output_file(relative: str) -> str:
    """Absolute path of a file this node wrote (tests, scripts)."""
    return os.path.join(host.output_directory(), relative)


NODE_CLASS_MAPPINGS = {"NVSFieldExportMesh": NVSFieldExportMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSFieldExportMesh": "NVS Field Export Mesh"}
