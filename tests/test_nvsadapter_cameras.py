"""NVS-Adapter cameras: our NVS_CAMERA conversion reproduces the published camera chain (relative poses, rays,
the 144-channel embedding), the focal quirk and the channel layout."""
import math

import numpy as np
import pytest
import torch

from nvs_core.cameras import Cameras
from nvs_core.nvsadapter import cameras as C

TARGETS = [(0.0, 30.0), (15.0, 90.0), (-10.0, 180.0), (30.0, 270.0), (0.0, 72.0)]


def _published(elevations, azimuths, resolution=256):
    return C.rays_context_spherical([elevations], [azimuths], 1.5, resolution=resolution)[0]


def _ours(elevations, azimuths, resolution=256, fov_deg=C.OBJAVERSE_FOV_DEG, focal="published"):
    ref = Cameras.from_spherical(0.0, 0.0, 1.5, math.radians(fov_deg), resolution, resolution)
    targets = Cameras.from_spherical(np.radians(elevations), np.radians(azimuths), 1.5, math.radians(fov_deg),
                                     resolution, resolution)
    return C.rays_context_for_cameras(ref, targets, resolution, focal=focal)[0]


def _channel_frequency() -> torch.Tensor:
    """k of each of the 144 channels (-1 for the raw vectors), from the documented layout."""
    k = torch.full((144,), -1)
    k[3:48] = torch.arange(15).repeat(3)
    k[48:93] = torch.arange(15).repeat(3)
    k[96:120] = torch.arange(8).repeat(3)
    k[120:144] = torch.arange(8).repeat(3)
    return k


def test_nvs_camera_path_matches_the_published_chain():
    el, az = [e for e, _ in TARGETS], [a for _, a in TARGETS]
    ours, published = _ours(el, az), _published(el, az)
    assert ours.shape == published.shape == (6, 144, 32, 32)
    # The published matrices carry +1e-6 normalisation errors; the high bands magnify 1e-6 differences by 2^k.
    k = _channel_frequency().double().clamp_min(0)[:, None, None]
    err = (ours.double() - published.double()).abs().amax(dim=0)
    assert (err <= 1e-5 + 3e-6 * 2 ** k).all()
    raw = [0, 1, 2, 93, 94, 95]
    assert (err[raw] <= 1e-5).all()


def test_reference_view_is_the_identity_pose():
    pe = _ours([10.0], [45.0])
    moment, direction = pe[0, 0:3], pe[0, 93:96]
    assert moment.abs().max() < 1e-6  # rays through the origin of its own frame
    centre = direction[:, 15:17, 15:17].mean(dim=(1, 2))  # near the optical axis: the published +z
    assert torch.allclose(centre / centre.norm(), torch.tensor([0.0, 0.0, 1.0]), atol=0.05)


def test_embedding_layout_and_sin_shift():
    v = torch.tensor([[[[[0.3, -0.2, 0.5]]]]])
    emb = C.sinusoidal_embedding(v, (0, 15))
    assert emb.shape[-1] == 93
    assert torch.equal(emb[..., :3], v)
    assert torch.allclose(emb[..., 3 + 15 * 1 + 4], torch.sin(v[..., 1] * 16))
    assert torch.allclose(emb[..., 48 + 15 * 2 + 3], torch.sin(v[..., 2] * 8 + math.pi / 2))


def test_focal_quirk_and_modes():
    K = C.published_intrinsics(math.radians(49.1), 256, 256)
    assert K[0, 0].item() == pytest.approx(110.877075, abs=1e-4) and K[0, 2].item() == 128
    cam = Cameras.from_spherical(0.0, 0.0, 1.5, math.radians(49.1), 256, 256)
    assert torch.allclose(C.model_intrinsics(cam, 256)[0], K)
    assert C.model_intrinsics(cam, 256, focal="camera")[0, 0, 0].item() == pytest.approx(280.2, abs=0.1)
    assert not torch.allclose(_ours([0.0], [30.0], focal="camera"), _ours([0.0], [30.0]))
    with pytest.raises(ValueError, match="focal must be one of"):
        C.model_intrinsics(cam, 256, focal="fov")


def test_bad_camera_batches():
    cam = Cameras.from_spherical(0.0, 0.0, 1.5, math.radians(49.1), 256, 256)
    two = Cameras.cat([cam, cam])
    with pytest.raises(ValueError, match="expected at least one camera"):
        C.rays_context_for_cameras(cam, two[:0])
    with pytest.raises(ValueError, match="exactly one camera"):
        C.rays_context_for_cameras(two, cam)
    with pytest.raises(ValueError, match="multiple of the latent stride"):
        C.rays_context_for_cameras(cam, cam, resolution=100)
