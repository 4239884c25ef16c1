"""RealFusion (``lukemelas/realfusion``) reconstruction stage in pure PyTorch.

- :mod:`.grid`: the tiled multi-resolution grid with the CUDA kernel's exact index rule;
- :mod:`.field`: the radiance field (``NeRFNetwork``), shading, background, occupancy grid;
- :mod:`.raymarch` / :mod:`.renderer`: fixed-step marching with the 128^3 occupancy bitfield,
  compositing with early termination, training and evaluation paths;
- :mod:`.cameras`: RealFusion's mirror-handed y-up orbit poses, direction labels and prompts, and
  conversion to and from ``NVS_CAMERA``;
- :mod:`.losses`: the input-view and regulariser losses of the published trainer;
- :mod:`.loading`: the published ``df.pth`` and our safetensors format.

Facts and quirks: ``shared/research/seeds-viewneti-realfusion.md`` Part C and the golden README.
"""
from .field import FieldConfig, RealFusionField, parameter_count  # noqa: F401
from .loading import build_field, load_field, save_field  # noqa: F401
from .renderer import render_cameras, render_rays  # noqa: F401
