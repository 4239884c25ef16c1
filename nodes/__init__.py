"""ComfyUI node classes of the pack, one module per concern; thin wrappers over nvs_core.

Importing this package never needs ComfyUI (host access lives in ``nodes.host``, lazily).
"""
from . import (nodes_camera, nodes_data, nodes_dtu, nodes_genvs, nodes_genvs_train, nodes_metrics, nodes_nvsadapter,
               nodes_realfusion, nodes_viewneti, nodes_viewneti_train, nodes_vivid)
from . import nodes_realfusion_mesh, nodes_textual_inversion

NODE_MODULES = (nodes_camera, nodes_data, nodes_dtu, nodes_genvs, nodes_genvs_train, nodes_metrics, nodes_nvsadapter,
                nodes_realfusion, nodes_viewneti, nodes_viewneti_train, nodes_vivid,
                nodes_realfusion_mesh, nodes_textual_inversion)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
