"""ComfyUI-NVS core library: cameras, data, models, loaders and samplers.

Plain PyTorch; never imports ComfyUI (see ARCHITECTURE.md section 1).
"""

__version__ = "0.1.0"
