"""VIVID (apple/ml-vivid): EDM2-based pixel-space novel-view synthesis, re-implemented from scratch.

Networks load the published checkpoints' state dicts unchanged; see ``loading`` for the safe
reader of the published ``.pkl`` snapshots, ``sampler`` for the EDM Heun sampler with
autoguidance and the 64 -> 256 SR stage, ``geometry`` for the 20-d camera label.
"""
