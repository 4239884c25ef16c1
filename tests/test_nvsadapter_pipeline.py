"""Reference photo + cameras -> views on tiny random SD components: preprocessing, CLIP embedding, groups of
views, seeding and bad input."""
import functools
import math

import pytest
import torch

from nvs_core.cameras import Cameras
from nvs_core.nvsadapter.config import TINY_SD
from nvs_core.nvsadapter.model import NVSAdapter
from nvs_core.nvsadapter.pipeline import clip_image_embedding, generate_views, prepare_reference, white_background
from nvs_core.progress import Progress
from nvs_core.sd import tiny
from nvs_core.sd.diffusers_backend import DiffusersSDBackend

PX = 32  # the tiny VAE halves: 32 px -> 16x16 latents (TINY_SD.latent_resolution)


@functools.lru_cache(maxsize=None)
def _parts():
    g = torch.Generator().manual_seed(0)
    backend = DiffusersSDBackend(tiny.randomize_(tiny.tiny_unet(0), g, 0.2), tiny.tiny_clip(0), None, tiny.tiny_vae(0))
    adapter = tiny.randomize_(NVSAdapter(TINY_SD), g, 0.2).train(False)
    return backend, adapter, tiny.tiny_clip_vision(0)


def _cameras(elevations, azimuths):
    return Cameras.from_spherical([math.radians(e) for e in elevations], [math.radians(a) for a in azimuths], 1.5,
                                  math.radians(49.1), PX, PX)


def test_preprocessing():
    image = torch.rand(1, 3, 40, 40)
    alpha = torch.zeros(1, 40, 40)
    alpha[:, 10:30, 10:30] = 1
    white = white_background(image, alpha)
    assert torch.equal(white[:, :, 0, 0], torch.ones(1, 3)) and torch.equal(white[:, :, 20, 20], image[:, :, 20, 20])
    ref = prepare_reference(image, alpha, 32)
    assert ref.shape == (1, 3, 32, 32) and ref.min() >= -1 and ref.max() <= 1
    with pytest.raises(ValueError, match="no object pixels"):
        prepare_reference(image, torch.zeros(1, 40, 40))
    emb = clip_image_embedding(_parts()[2], ref)
    assert emb.shape == (1, 1, 24)


def test_views_in_groups_are_seeded():
    backend, adapter, vision = _parts()
    image = torch.rand(1, 3, PX, PX, generator=torch.Generator().manual_seed(2))
    emb = clip_image_embedding(vision, prepare_reference(image, resolution=PX))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    updates = []

    def run(seed, views_per_batch):
        with torch.no_grad():
            return generate_views(backend, adapter, image, _cameras([0], [0]), _cameras([0, 15, -10], [30, 90, 180]),
                                  emb, text, steps=2, seed=seed, views_per_batch=views_per_batch, resolution=PX,
                                  progress=lambda total, desc="": Progress(total, desc,
                                                                           on_update=lambda d, n: updates.append(n)))

    views = run(0, 2)
    assert views.shape == (3, 3, PX, PX) and views.min() >= 0 and views.max() <= 1
    assert set(updates) == {4} and len(updates) == 4  # one bar: 2 groups x 2 steps
    assert torch.equal(views, run(0, 2)) and not torch.equal(views, run(1, 2))
    with pytest.raises(ValueError, match="empty batch"):
        generate_views(backend, adapter, image, _cameras([0], [0]), _cameras([0], [0])[:0], emb, text)


def test_clip_embedding_from_any_encoder():
    from nvs_core.nvsadapter.pipeline import clip_pixels

    images = torch.rand(2, 3, 48, 48) * 2 - 1
    pixels = clip_pixels(images)
    assert pixels.shape == (2, 3, 224, 224)
    got = clip_image_embedding(lambda px: px.mean(dim=(2, 3)), images)
    assert torch.equal(got, pixels.mean(dim=(2, 3)).unsqueeze(1))
    with pytest.raises(ValueError, match="expected projected image embeddings"):
        clip_image_embedding(lambda px: px, images)
