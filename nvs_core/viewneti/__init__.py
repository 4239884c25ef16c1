"""ViewNeTI (jmhb0/view_neti, "Viewpoint Textual Inversion") and the original NeTI mapper, from scratch.

- ``mapper``: the arch-15 view/object mapper and the NeTI mapper (state-dict keys as published);
- ``camera_tokens``: DTU 12-d view tokens, calibration folders, min/max normalisation, DTU <-> Cameras,
  and the spherical tokens for non-DTU data;
- ``config``: mapper constructor kwargs from a checkpoint's cfg, and the options for published bugs;
- ``loading``: safe reading of ``mapper-steps-N_{view,object}.pt``, NeTI ``mapper-steps-N.pt`` and
  ``learned_embeds*.bin``, the bundle :class:`ViewNetiModel`, and the "viewneti" converter;
- ``text``: CLIP text encoding with the mapper outputs injected (keys and values contexts).
"""
from .camera_tokens import (DTUCalibration, DTUCameraRange, SphericalViewRange, cameras_from_dtu_projections,
                            dtu_projections_from_cameras, dtu_view_tokens_for_cameras, format_dtu_view_token,
                            format_spherical_view_token, parse_dtu_view_token, parse_spherical_view_token)
from .config import ViewNetiLoadOptions, viewneti_mapper_kwargs
from .loading import (ViewNetiModel, load_learned_embeds, load_mapper_file, load_viewneti, read_mapper_file)
from .mapper import MapperOutput, NetiMapper, ViewNetiMapper
from .text import PlaceholderVectors, TextEncoding, encode_text_with_mapper_outputs

__all__ = [
    "ViewNetiMapper", "NetiMapper", "MapperOutput", "ViewNetiLoadOptions", "viewneti_mapper_kwargs",
    "DTUCalibration", "DTUCameraRange", "SphericalViewRange", "format_dtu_view_token", "parse_dtu_view_token",
    "format_spherical_view_token", "parse_spherical_view_token", "cameras_from_dtu_projections",
    "dtu_projections_from_cameras", "dtu_view_tokens_for_cameras", "ViewNetiModel", "load_viewneti",
    "load_mapper_file", "read_mapper_file", "load_learned_embeds", "PlaceholderVectors", "TextEncoding",
    "encode_text_with_mapper_outputs",
]
