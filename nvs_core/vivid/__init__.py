"""VIVID (apple/ml-vivid): EDM2-based pixel-space novel-view synthesis, re-implemented from scratch.

- ``layers``: magnitude-preserving EDM2 ops; ``networks``: Block/XAttnBlock and the U-Nets;
- ``precond``: ``NVPrecond``, the published network (preconditioning, encoder, denoiser);
- ``geometry``: the standardised 20-d camera label and the RealEstate10K line reader;
- ``sampler``: EDM Heun sampler with autoguidance, per-seed noise, the SR stage, pixel coding;
- ``loading``: networks from ``_init_kwargs``, safe reading of the published ``.pkl`` snapshots.
"""
from .geometry import compose_geometry, dataset_geometry, decompose_geometry
from .precond import NVPrecond
from .sampler import SeededNoise, decode_pixels, edm_sampler, encode_pixels, generate_views, seeded_noise

__all__ = ["NVPrecond", "compose_geometry", "decompose_geometry", "dataset_geometry", "edm_sampler",
           "generate_views", "SeededNoise", "seeded_noise", "encode_pixels", "decode_pixels"]
