"""ViewNeTI (jmhb0/view_neti, "Viewpoint Textual Inversion") and the original NeTI mapper, from scratch.

- ``mapper``: the arch-15 view/object mapper and the NeTI mapper (state-dict keys as published);
- ``camera_tokens``: DTU 12-d view tokens, calibration folders, min/max normalisation, DTU <-> Cameras,
  and the spherical tokens for non-DTU data;
- ``config``: mapper constructor kwargs from a checkpoint's cfg, and the options for published bugs;
- ``loading``: safe reading of ``mapper-steps-N_{view,object}.pt``, NeTI ``mapper-steps-N.pt`` and
  ``learned_embeds*.bin``, the bundle :class:`ViewNetiModel`, and the "viewneti" converter;
- ``text``: CLIP text encoding with the mapper outputs injected (keys and values contexts).

Published bugs and quirks, and what we do:
- the view mapper is given ``output_bypass_alpha_object`` (``CheckpointHandler.load_mapper``):
  reproduced by default, ``ViewNetiLoadOptions(view_alpha_from_object=False)`` uses the view's own;
- ``load_mapper`` leaves alpha unset (and crashes) for configs without ``bypass_unconstrained_*``:
  fixed, such configs load with the stored alphas (0.2 if absent);
- the Fourier matrix is regenerated from seed 0 and the pickled one ignored: we take the pickled one
  (identical in every file the published code wrote), ``fourier_matrix="seed0"`` follows upstream;
- building a mapper reseeds the global torch RNG: not reproduced (a private generator draws W);
- the DTU inference scripts crash for non-mode-3 checkpoints (``eval_placeholder_object_tokens=None``
  iterated, ``results`` used before assignment): not applicable here, there is no inference loop.
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
