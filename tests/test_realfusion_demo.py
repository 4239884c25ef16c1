"""``python -m nvs_core demo --method field`` (reduced run), its chamfer and surface sampling, CLI dispatch."""
import json

import pytest
import torch

from nvs_core.procedural import Scene
from nvs_core.realfusion import demo


def test_reduced_demo_run(tmp_path):
    summary = demo.run(tmp_path, seed=3, iters=48, size=16, rays=256, mesh_resolution=32, orbit_frames=2, max_steps=128)
    for name in ("orbit.gif", "mesh.glb", "metrics.json", "field.safetensors", "field.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["model"]) == {"psnr", "ssim"} and set(metrics["copy_source"]) == {"psnr", "ssim"}
    assert metrics["model"]["psnr"] > metrics["copy_source"]["psnr"] + 1  # the full demo reaches +12.5 dB
    assert 0 < metrics["chamfer"] < 0.1 and metrics == summary
    import trimesh

    mesh = trimesh.load(tmp_path / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100


def test_surface_points_and_chamfer():
    scene = Scene.from_objects([{"kind": "sphere", "size": [0.5]}])
    pts = demo.surface_points(scene, count=500)
    torch.testing.assert_close(pts.norm(dim=-1), torch.full((500,), 0.5, dtype=torch.float64), atol=1e-9, rtol=0)
    assert demo.chamfer(pts, pts) == 0
    assert demo.chamfer(pts, pts * 1.1) == pytest.approx(0.05, abs=0.01)


def test_cli_dispatch(monkeypatch, tmp_path):
    from nvs_core import __main__ as cli

    calls = []
    monkeypatch.setattr(demo, "run", lambda out, seed: calls.append((out, seed)))
    assert cli.main(["demo", "--method", "field", "--out", str(tmp_path), "--seed", "5"]) == 0
    assert calls == [(str(tmp_path), 5)]
