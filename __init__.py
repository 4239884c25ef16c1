"""ComfyUI-NVS: novel-view synthesis and single-image 3D nodes for ComfyUI.

ComfyUI imports this folder as a package; everything below is reached with relative imports, so
the pack needs no sys.path changes and never shadows ComfyUI's own ``nodes`` module.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import host as _host

_host.register_model_folders()

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
