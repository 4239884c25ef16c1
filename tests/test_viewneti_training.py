"""ViewNeTI training (nvs_core.viewneti.training) on tiny random SD components through the diffusers adapter."""
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("kornia")

from nvs_core import cameras as C  # noqa: E402
from nvs_core.multiview import MultiView, save_folder  # noqa: E402
from nvs_core.progress import Interrupted, Progress  # noqa: E402
from nvs_core.sd.tiny import OBJECT, VIEW, tiny_backend_with_tokenizer  # noqa: E402
from nvs_core.viewneti import training as T  # noqa: E402
from nvs_core.viewneti.camera_tokens import DTUCalibration, SphericalViewRange  # noqa: E402
from nvs_core.viewneti.loading import ViewNetiModel  # noqa: E402
from tests.paths import GOLDEN_DIR as GOLDEN  # noqa: E402


def backend(prediction_type="v_prediction"):
    return tiny_backend_with_tokenizer(prediction_type=prediction_type)


def views(count=3, size=16, seed=0, elevation=0.3):
    cams = C.orbit(count, elevation, 0.0, 2 * math.pi, 2.5, math.radians(40), size, size)
    images = torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))
    return MultiView(images, cams)


def scene(token=T.DEFAULT_OBJECT_TOKEN, seed=0, representation="spherical"):
    return T.scene_from_multiview(views(seed=seed), representation, token)


def config(tmp_path=None, **kwargs):
    base = dict(learnable_mode=2, steps=2, batch_size=2, gradient_accumulation=1, augmentation="none",
                checkpoint_every=0, name="run", out_dir=str(tmp_path) if tmp_path else None, resume=False)
    return T.ViewNetiTrainConfig(**(base | kwargs))


def pretrained(width=32, seed=5):
    view = T.new_mapper("view", width, 1.0, 5.0, "phi", seed)
    tokens = T.spherical_view_tokens(views().cameras)
    return ViewNetiModel(view.train(False).requires_grad_(False), {}, {}, SphericalViewRange.from_tokens(tokens),
                         tokens)


def state(mapper):
    return {k: v.clone() for k, v in mapper.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- round trip

def test_trained_files_load_back_through_load_viewneti(tmp_path):
    result = T.train_viewneti(backend(), [scene()], config(tmp_path))
    assert result.step == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert set(result.files) == {"view", "object", "learned_embeds", "state"}
    loaded = T.load_trained(tmp_path, "run")
    assert same(state(loaded.view), state(result.model.view))
    assert list(loaded.objects) == ["<object>"] and same(state(loaded.objects["<object>"]),
                                                         state(result.model.objects["<object>"]))
    assert loaded.view.camera_representation == "phi" and loaded.view.bypass_alpha == 5.0
    tokens = T.spherical_view_tokens(views().cameras)
    assert torch.equal(loaded.view_inputs(tokens), result.model.view_inputs(tokens))
    t, layer = torch.tensor([999.0, 3.0]), torch.tensor([0.0, 15.0])
    with torch.no_grad():
        a, b = loaded.view(t, layer, loaded.view_inputs(tokens[:2])), result.model.view(t, layer,
                                                                                         loaded.view_inputs(tokens[:2]))
    assert torch.equal(a.word, b.word) and torch.equal(a.bypass, b.bypass)
    # word vectors keep the norm of the super-category word's embedding, as published
    norm = backend().text_encoder.get_input_embeddings().weight[VIEW].norm()
    assert torch.allclose(a.word.norm(dim=-1), norm.expand(2), atol=1e-5)


def test_only_mapper_parameters_get_gradients_and_change(tmp_path):
    sd = backend()
    frozen = {n: p.clone() for n, p in sd.unet_model.named_parameters()}
    result = T.train_viewneti(sd, [scene()], config(tmp_path, steps=1))
    for module in (sd.unet_model, sd.text_encoder, sd.vae):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in sd.unet_model.named_parameters())
    fresh = T.new_mapper("view", 32, 1.0, 5.0, "phi", 0).state_dict()
    assert not same(state(result.model.view), fresh)  # the mapper moved
    assert not result.model.view.training and not any(p.requires_grad for p in result.model.view.parameters())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_loss_is_mse_against_the_prediction_target(prediction_type, monkeypatch):
    sd = backend(prediction_type)
    seen = {}
    encode, unet = sd.encode_images, sd.unet

    def recording_encode(images, sample=True, generator=None):
        assert sample and images.min() >= -1 and images.max() <= 1  # posterior sample of [-1, 1] pixels
        seen["x0"] = encode(images, sample, generator)
        return seen["x0"]

    def recording_unet(latents, timesteps, context, chunks=None, patches=None):
        seen.update(noisy=latents, t=timesteps)
        seen["out"] = unet(latents, timesteps, context, chunks, patches)
        return seen["out"]

    monkeypatch.setattr(sd, "encode_images", recording_encode)
    monkeypatch.setattr(sd, "unet", recording_unet)
    cfg = config(batch_size=3)
    sc = scene()
    view = T.new_mapper("view", 32, 1.0, 5.0, "phi", 0)
    obj = T.new_mapper("object", 32, 1.0, 5.0, None, 1)
    ids = T.caption_ids(sd, ["view. A photo of a object"])[0]
    pixels = T._resize(sc.images, 16, 16)
    params = ViewNetiModel(view, {}, {}, SphericalViewRange.from_tokens(sc.view_tokens)).view_inputs(sc.view_tokens)
    patches = T.UNetPatches(contexts=T._CurrentContexts())
    loss = T._micro_batch(sd, patches, sd.schedule, cfg, 2, sc, pixels, params, view, VIEW, obj, OBJECT, ids, None,
                          T.Augmenter("none", 16, 16), torch.Generator().manual_seed(3), "cpu")
    t = seen["t"]
    assert t.dtype == torch.float32 and t.shape == (3,) and 0 <= t.min() and t.max() <= 999
    abar = 1 / (1 + sd.schedule.sigma(t) ** 2).reshape(-1, 1, 1, 1)
    noise = (seen["noisy"] - abar.sqrt() * seen["x0"]) / (1 - abar).sqrt()
    target = abar.sqrt() * noise - (1 - abar).sqrt() * seen["x0"] if prediction_type == "v_prediction" else noise
    assert torch.allclose(loss, ((seen["out"] - target) ** 2).mean(), rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in list(view.parameters()) + list(obj.parameters()))


# ------------------------------------------------------------------------------------------------ modes

def test_mode_0_has_no_view_mapper_and_uses_templates(tmp_path, monkeypatch):
    captions = []
    original = T.caption_ids

    def record(sd, texts):
        captions.extend(texts)
        return original(sd, texts)

    monkeypatch.setattr(T, "caption_ids", record)
    plain = T.TrainingScene(views().images)  # no cameras needed
    result = T.train_viewneti(backend(), [plain], config(tmp_path, learnable_mode=0))
    assert result.model.view is None and list(result.model.objects) == ["<object>"]
    assert len(captions) == 27 and captions[0] == "a photo of a object"
    assert set(result.files) == {"object", "learned_embeds", "state"}
    assert T.load_trained(tmp_path, "run").view is None


def test_mode_3_one_object_per_scene_each_micro_batch_from_one_scene(tmp_path):
    scenes = [scene("<scan1>", 0), scene("<scan2>", 1)]
    before = [state(T.new_mapper("object", 32, 1.0, 5.0, None, 0 + 1 + i)) for i in range(2)]
    result = T.train_viewneti(backend(), scenes, config(tmp_path, learnable_mode=3, steps=1))
    changed = [not same(state(result.model.objects[s.object_token]), before[i]) for i, s in enumerate(scenes)]
    assert sum(changed) == 1  # one micro-batch, one scene: only its object mapper got gradients
    loaded = T.load_trained(tmp_path, "run")
    assert list(loaded.objects) == ["<scan1>", "<scan2>"] and loaded.view is not None
    with pytest.raises(ValueError, match="distinct object placeholder"):
        T.train_viewneti(backend(), [scene("<a>"), scene("<a>")], config(learnable_mode=3))
    with pytest.raises(ValueError, match="trains one object"):
        T.train_viewneti(backend(), scenes, config(learnable_mode=2))


@pytest.mark.parametrize("mode", [4, 5])
def test_modes_4_and_5_start_from_the_pretrained_view_mapper(mode, tmp_path):
    model = pretrained()
    original = state(model.view)
    result = T.train_viewneti(backend(), [scene()], config(tmp_path, learnable_mode=mode), pretrained=model)
    assert same(state(model.view), original)  # the input is never modified
    trained_view = state(result.model.view)
    assert same(trained_view, original) == (mode == 5)  # 4 trains it, 5 keeps it frozen
    assert T.load_trained(tmp_path, "run").view_range == model.view_range
    meta = json.loads((tmp_path / "training-state.json").read_text())["meta"]
    params = meta["param_groups"][0]["params"]
    assert len(params) == (20 if mode == 4 else 10)  # view (10 tensors) only in mode 4, then the object mapper


def test_published_optimiser_and_learning_rate_scaling(tmp_path):
    cfg = config(tmp_path, steps=1, batch_size=3, gradient_accumulation=3)
    assert cfg.effective_learning_rate == pytest.approx(9e-3)
    assert config(scale_lr=False, batch_size=3, gradient_accumulation=3).effective_learning_rate == 1e-3
    result = T.train_viewneti(backend(), [scene()], cfg)
    assert result.effective_learning_rate == pytest.approx(9e-3)
    group = json.loads((tmp_path / "training-state.json").read_text())["meta"]["param_groups"][0]
    assert group["lr"] == pytest.approx(9e-3) and group["betas"] == [0.9, 0.999]
    assert group["weight_decay"] == 1e-2 and group["eps"] == 1e-8


# ------------------------------------------------------------------------------------ resume, interrupt, NaN

def test_resume_continues_exactly(tmp_path):
    straight = T.train_viewneti(backend(), [scene()], config(tmp_path / "a", steps=3, batch_size=1))
    T.train_viewneti(backend(), [scene()], config(tmp_path / "b", steps=1, batch_size=1))
    resumed = T.train_viewneti(backend(), [scene()], config(tmp_path / "b", steps=3, batch_size=1, resume=True))
    assert resumed.losses == straight.losses
    assert same(state(resumed.model.view), state(straight.model.view))
    with pytest.raises(T.CheckpointError, match="different recipe"):
        T.train_viewneti(backend(), [scene()], config(tmp_path / "b", steps=4, batch_size=2, resume=True))


def test_interrupt_saves_a_checkpoint(tmp_path):
    def progress(total, desc):
        return Progress(total, desc, should_stop=lambda: stop["now"])

    stop = {"now": False}

    def callback(info):
        stop["now"] = info["step"] >= 1

    with pytest.raises(Interrupted):
        T.train_viewneti(backend(), [scene()], config(tmp_path, steps=5, batch_size=1), progress=progress,
                         callback=callback)
    meta = json.loads((tmp_path / "training-state.json").read_text())["meta"]
    assert meta["step"] == 1 and (tmp_path / "run_view.safetensors").is_file()


def test_nan_guard_skips_then_stops(tmp_path, monkeypatch):
    sd = backend()
    unet = sd.unet
    monkeypatch.setattr(sd, "unet", lambda *a, **k: unet(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        T.train_viewneti(sd, [scene()], config(tmp_path, steps=5, batch_size=1, max_bad_steps=3))
    assert not (tmp_path / "training-state.safetensors").exists()  # nothing non-finite is saved


# ------------------------------------------------------------------------------------- DTU, augmentations

def test_dtu_tokens_train_with_the_calibration_range(tmp_path):
    calibration = DTUCalibration.from_folder(GOLDEN / "viewneti" / "cal18_synthetic")
    keys = [25, 22, 28]
    mv = MultiView(torch.rand(3, 16, 16, 3), calibration.to_cameras()[keys].with_size(16, 16))
    dtu_scene = T.scene_from_multiview(mv, "dtu-12d", dtu_calibration=calibration, dtu_keys=keys)
    assert dtu_scene.view_tokens == [calibration.token(k) for k in keys]
    with pytest.raises(ValueError, match="DTU camera range"):
        T.train_viewneti(backend(), [dtu_scene], config())
    result = T.train_viewneti(backend(), [dtu_scene], config(tmp_path, steps=1), dtu_camera_range=
                              calibration.camera_range())
    loaded = T.load_trained(tmp_path, "run")
    assert loaded.view.camera_representation == "dtu-12d" and loaded.view.view_dims == 12
    assert torch.equal(loaded.view_range.mins, calibration.camera_range().mins)
    assert torch.equal(loaded.view_inputs(dtu_scene.view_tokens), result.model.view_inputs(dtu_scene.view_tokens))


@pytest.mark.parametrize("preset", T.AUGMENTATIONS)
def test_augmentation_presets(preset):
    images = torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    augment = T.Augmenter(preset, 24, 32)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, images) == (preset == "none")


def test_rotation_border_is_the_published_fill():
    import kornia.augmentation as K

    augment = T.Augmenter("none", 32, 32)
    augment.blocks = [("rotate", K.RandomRotation((30.0, 30.0), p=1.0))]
    out = augment(torch.ones(1, 3, 32, 32), torch.Generator().manual_seed(0))
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 1 / 255), atol=1e-6)
    assert torch.allclose(out[0, :, 16, 16], torch.ones(3), atol=1e-6)


# ----------------------------------------------------------------------------------------- bad input

def test_bad_inputs_give_clear_errors():
    sd = backend()
    with pytest.raises(ValueError, match="pretrained_view_mapper: learnable mode 5"):
        T.train_viewneti(sd, [scene()], config(learnable_mode=5))
    with pytest.raises(ValueError, match="pretrained_view_mapper: learnable mode 4"):
        T.train_viewneti(sd, [scene()], config(learnable_mode=4), pretrained=ViewNetiModel(None, {}, {}))
    with pytest.raises(ValueError, match="768 wide but the model's text encoder is 32 wide"):
        T.train_viewneti(sd, [scene()], config(learnable_mode=5), pretrained=pretrained(width=768))
    with pytest.raises(ValueError, match="training set is empty"):
        T.TrainingScene(torch.zeros(0, 16, 16, 3))
    with pytest.raises(ValueError, match="training set is empty"):
        T.train_viewneti(sd, [], config())
    with pytest.raises(ValueError, match="3 images but 2 cameras"):
        T.scene_from_images(torch.rand(3, 16, 16, 3), views(2).cameras)
    with pytest.raises(ValueError, match="batch_size must be 1..3"):
        config(batch_size=4)
    with pytest.raises(ValueError, match="learnable_mode must be one of"):
        config(learnable_mode=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        config(resolution=[20, 16])
    with pytest.raises(ValueError, match="needs a camera per image"):
        T.train_viewneti(sd, [T.TrainingScene(torch.rand(2, 16, 16, 3))], config())
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            T.train_viewneti(sd, [scene()], config())


def test_cli_trains_a_folder(tmp_path, monkeypatch, capsys):
    from nvs_core.__main__ import main

    save_folder(views(), tmp_path / "scene")
    monkeypatch.setattr(T, "_load_backend", lambda args: backend())
    assert main(["viewneti-train", "--sd", "unused", "--folder", str(tmp_path / "scene"), "--mode", "2",
                 "--steps", "1", "--batch", "1", "--accumulation", "1", "--augmentation", "none",
                 "--out", str(tmp_path / "out"), "--name", "cli"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 1 and line["effective_lr"] == pytest.approx(1e-3)
    assert T.load_trained(tmp_path / "out", "cli").view is not None


def test_cli_trains_dtu_scans_in_mode_3(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from nvs_core.__main__ import main

    for scan in (3, 4):
        folder = tmp_path / "dtu" / "Rectified" / f"scan{scan}"
        folder.mkdir(parents=True)
        for k in (25, 22, 28):
            Image.fromarray((torch.rand(12, 16, 3) * 255).to(torch.uint8).numpy()).save(
                folder / f"rect_{k + 1:03d}_3_r5000.png")
    calibration = tmp_path / "dtu" / "Calibration" / "cal18"
    calibration.mkdir(parents=True)
    for path in (GOLDEN / "viewneti" / "cal18_synthetic").glob("pos_*.txt"):
        (calibration / path.name).write_text(path.read_text())
    monkeypatch.setattr(T, "_load_backend", lambda args: backend())
    assert main(["viewneti-train", "--sd", "unused", "--dtu-root", str(tmp_path / "dtu"), "--dtu-scan", "3",
                 "--dtu-scan", "4", "--dtu-subset", "3", "--mode", "3", "--steps", "1", "--batch", "1",
                 "--accumulation", "1", "--width", "16", "--height", "16", "--augmentation", "published-5",
                 "--out", str(tmp_path / "out")]) == 0
    model = T.load_trained(tmp_path / "out")
    assert list(model.objects) == ["<scan3>", "<scan4>"] and model.view.camera_representation == "dtu-12d"
    tokens = [DTUCalibration.from_folder(calibration).token(k) for k in (22, 25, 28)]
    assert json.loads((tmp_path / "out" / "viewneti_view.json").read_text())["meta"]["cfg"]["data"][
        "training_view_tokens"][:3] == tokens  # load_dtu_scan's sorted order, tokens from the calibration files
