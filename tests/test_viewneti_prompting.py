"""ViewNeTI inference helpers without a host: templates, view rows for cameras, bounded contexts."""
import math
import os
from pathlib import Path

import pytest
import torch

from nvs_core import cameras as cam
from nvs_core.sd import COND, LayerCall
from nvs_core.viewneti import prompting as P
from nvs_core.viewneti.camera_tokens import DTUCalibration, dtu_view_tokens_for_cameras
from nvs_core.viewneti.injection import ViewNetiContexts
from nvs_core.viewneti.loading import ViewNetiModel, load_viewneti
from nvs_core.viewneti.mapper import ViewNetiMapper
from tests.paths import GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "viewneti"
needs_golden = pytest.mark.skipif(not (GOLDEN / "checkpoints").is_dir(), reason="golden ViewNeTI files not found")
BOS, EOS, PAD = 60, 61, 0


def word_tokenize(texts, length=16):
    """A stand-in tokenizer: each word (and '.') one id in 1..40, rows [BOS, ..., EOS, PAD...]."""
    rows = []
    for text in texts:
        words = text.lower().replace(".", " . ").split()
        ids = [BOS] + [1 + sum(map(ord, w)) % 40 for w in words][:length - 2] + [EOS]
        rows.append(ids + [PAD] * (length - len(ids)))
    return torch.tensor(rows)


# ------------------------------------------------------------------------------ templates
def test_template_fields_and_plain_text():
    t = P.PromptTemplate.parse("{view}. A photo of a {object}")
    assert t.fields == ("view", "object") and t.segments == ("", ". A photo of a ", "")
    assert t.plain_text() == "view. A photo of a object"
    assert P.PromptTemplate.parse("{ view }. a red car").fields == ("view",)


@pytest.mark.parametrize("text, message", [
    ("{view} and {view}", "more than once"), ("{camera}. a car", "unknown field"), ("{view}. a {car", "unmatched"),
    ("a } car {view}", "unmatched")])
def test_template_errors(text, message):
    with pytest.raises(ValueError, match=message) as info:
        P.PromptTemplate.parse(text)
    assert "prompt_template" in str(info.value)


def test_template_fields_must_match_the_mappers():
    view_only = P.PromptTemplate.parse("a photo of a car")
    with pytest.raises(ValueError, match=r"prompt_template: the template has no \{view\}"):
        P.check_template_fields(view_only, True, False)
    with pytest.raises(ValueError, match="no object mapper is loaded"):
        P.check_template_fields(P.PromptTemplate.parse("{view}. {object}"), True, False)
    with pytest.raises(ValueError, match="no view mapper is loaded"):
        P.check_template_fields(P.PromptTemplate.parse("{view}. {object}"), False, True)
    P.check_template_fields(P.PromptTemplate.parse("{view}. A photo of a red car"), True, True)


def test_tokenized_template_splices_placeholders_between_the_pieces():
    template = P.PromptTemplate.parse("{view}. A photo of a {object}")
    out = P.tokenize_template(template, word_tokenize, vocab_size=64)
    plain = word_tokenize(["view . A photo of a object"])[0]
    ids = out.input_ids[0]
    assert out.positions == {"view": 1, "object": 7} and out.length == 9
    assert ids[out.positions["view"]] == out.token_ids["view"] and ids[7] == out.token_ids["object"]
    keep = [i for i in range(16) if i not in (1, 7)]
    assert torch.equal(ids[keep], plain[keep])  # the rest is the plain prompt, token for token
    assert set(out.token_ids.values()).isdisjoint(set(ids[keep].tolist()))
    assert len(set(out.token_ids.values())) == 2 and max(out.token_ids.values()) < 64
    with pytest.raises(ValueError, match="prompt_template: 15 tokens.*one chunk of 14"):
        P.tokenize_template(P.PromptTemplate.parse("{view} " + "word " * 14), word_tokenize, 64)


def _comfy_tokenizer_folder():
    root = os.environ.get("COMFYUI_PATH", "/tmp/comfyui-host")
    folder = Path(root) / "comfy" / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


@pytest.mark.skipif(_comfy_tokenizer_folder() is None, reason="CLIP tokenizer files (ComfyUI's sd1_tokenizer) not found")
def test_placeholders_tokenize_as_added_tokens_do():
    """Upstream adds its placeholders with tokenizer.add_tokens; our splice gives the same ids around them."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(_comfy_tokenizer_folder()))
    tokenizer.add_tokens(["<view>", "<object>"])

    def tokenize(texts):
        return tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids

    for text in ("{view}. A photo of a {object}", "{view}, a red car; close-up photo of a {object}!",
                 "A photo of a {object} seen from {view}"):
        ours = P.tokenize_template(P.PromptTemplate.parse(text), tokenize, 49408)
        theirs = tokenize([text.replace("{view}", "<view>").replace("{object}", "<object>")])[0]
        view, obj = tokenizer.convert_tokens_to_ids(["<view>", "<object>"])
        theirs = theirs.clone()
        theirs[theirs == view] = ours.token_ids["view"]
        theirs[theirs == obj] = ours.token_ids["object"]
        assert torch.equal(ours.input_ids[0], theirs), text


# ------------------------------------------------------------------------------ cameras
@pytest.fixture(scope="module")
def calibration():
    if not (GOLDEN / "cal18_synthetic").is_dir():
        pytest.skip("golden calibration folder not found")
    return DTUCalibration.from_folder(GOLDEN / "cal18_synthetic")


def _model(calibration, word_dim=32, with_object=True, seed=0, classes=None):
    """A ViewNetiModel of small random DTU mappers with the calibration attached. ``classes``: the
    (ViewNetiMapper, ViewNetiModel, prompting module) to build with (the pack's own, in node tests)."""
    mapper_cls, model_cls, prompting = classes or (ViewNetiMapper, ViewNetiModel, P)
    g = torch.Generator().manual_seed(seed)

    def mapper(view_dims):
        m = mapper_cls([0.03, 2.0] + [0.5] * view_dims, word_dim=word_dim, hidden_dim=16, fourier_dim=16,
                       target_norm=0.4, bypass_alpha=5.0)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return m.train(False)

    model = model_cls(mapper(12), {"<object>": mapper(0)} if with_object else {}, {}, calibration.camera_range())
    return prompting.attach_calibration(model, calibration)


def test_orbit_frame_puts_the_front_view_in_the_middle_of_the_rig(calibration):
    frame = P.DTUOrbitFrame.from_calibration(calibration)
    rig = calibration.to_cameras()
    assert torch.allclose(frame.rotation.T @ frame.rotation, torch.eye(3, dtype=torch.float64), atol=1e-12)
    front = cam.Cameras.from_spherical(0.0, 0.0, 2.0, math.radians(23.5), 1600, 1200)
    placed = frame.place(front, reference_radius=2.0)
    mean_direction = (rig.centers - frame.center).mean(0)
    expected = frame.center + frame.distance * mean_direction / mean_direction.norm()
    assert torch.allclose(placed.centers[0], expected, atol=1e-6)
    forward = placed.c2w[0, :3, 2]  # OpenCV +z: the viewing direction, towards the centre
    assert torch.allclose(forward, (frame.center - expected) / frame.distance, atol=1e-9)
    assert float(placed.c2w[0, :3, 1] @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)) < 0  # image-down is down
    closer = frame.place(front, reference_radius=4.0)  # the same camera, as if the rig were twice as far
    assert torch.allclose((closer.centers[0] - frame.center).norm(), torch.tensor(frame.distance / 2, dtype=torch.float64))


def test_view_rows_for_indices_and_cameras(calibration):
    model = _model(calibration)
    rows = P.view_rows(model, dtu_cameras="22, 25-26", calibration=calibration)
    assert rows.tokens == [calibration.token(k) for k in (22, 25, 26)] and rows.labels[0] == "DTU camera 22"
    assert torch.equal(rows.params, model.view_inputs(rows.tokens))
    # DTU scene coordinates: the calibration cameras themselves give their own numbers back (to 4 decimals)
    own = P.view_rows(model, cameras=calibration.to_cameras()[[22, 25]], calibration=calibration,
                      placement=P.PLACEMENTS[1])
    assert torch.allclose(own.params, rows.params[:2], atol=2e-3)
    orbit = cam.orbit(5, 0.0, math.radians(-30), math.radians(60), 2.0, math.radians(23.5), 768, 576)
    placed = P.view_rows(model, cameras=orbit, calibration=calibration)
    assert len(placed) == 5 and placed.params.abs().max() < 1.5
    frame = P.DTUOrbitFrame.from_calibration(calibration)
    assert placed.tokens == dtu_view_tokens_for_cameras(frame.place(orbit, 2.0))


def test_view_row_errors(calibration):
    model = _model(calibration)
    full_orbit = cam.orbit(8, math.radians(15), 0.0, 2 * math.pi, 2.0, math.radians(40), 768, 576)
    with pytest.raises(ValueError, match="cameras: camera 4 is outside the camera range.*max_extrapolation 2"):
        P.view_rows(model, cameras=full_orbit, calibration=calibration)
    P.view_rows(model, cameras=full_orbit, calibration=calibration, max_extrapolation=20.0)
    with pytest.raises(ValueError, match="dtu_cameras: DTU camera 64 is not in the calibration"):
        P.view_rows(model, dtu_cameras="60-64", calibration=calibration)
    with pytest.raises(ValueError, match="dtu_cameras: cannot read 'a'"):
        P.view_rows(model, dtu_cameras="a", calibration=calibration)
    with pytest.raises(ValueError, match="dtu_cameras: choosing DTU cameras by index needs the calibration folder"):
        P.view_rows(model, dtu_cameras="25", calibration=None)
    with pytest.raises(ValueError, match="cameras: placing an orbit around the DTU rig needs"):
        P.view_rows(model, cameras=full_orbit[:1], calibration=None)
    no_range = ViewNetiModel(model.view, {}, {}, None)
    with pytest.raises(ValueError, match="view_mapper: the view mapper has no camera range"):
        P.view_rows(no_range, dtu_cameras="25", calibration=calibration)


def test_calibration_numbers():
    numbers = list(range(12)) + list(range(10, 22))
    text = ", ".join(map(str, numbers))
    assert P.parse_calibration_numbers(text) == [float(n) for n in numbers]
    assert P.parse_calibration_numbers("cal18") is None
    assert P.camera_range_from_numbers(P.parse_calibration_numbers(text)).to_numbers() == [float(n) for n in numbers]
    with pytest.raises(ValueError, match="dtu_calibration: 3 numbers"):
        P.camera_range_from_numbers([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="dtu_calibration: DTU camera range has no extent"):
        P.camera_range_from_numbers([0.0] * 24)


@needs_golden
def test_word_width_must_match_the_text_encoder(calibration):
    model = load_viewneti(GOLDEN / "checkpoints" / "mapper-steps-10_view.pt",
                          GOLDEN / "checkpoints" / "mapper-steps-10_object.pt", calibration=calibration.camera_range())
    P.check_word_width(model, 1024)
    with pytest.raises(ValueError, match=r"view_mapper: the view mapper makes 1024-wide word embeddings \(SD 2.x"
                                         r".*768-wide tokens \(SD 1.x"):
        P.check_word_width(model, 768)


# ------------------------------------------------------------------------------ contexts
@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("diffusers")
    from nvs_core.sd.tiny import tiny_backend

    return tiny_backend(seed=2)


def _prompt(model, calibration, template="{view}. A photo of a {object}", keys="22, 25, 28"):
    views = P.view_rows(model, dtu_cameras=keys, calibration=calibration)
    return P.build_prompt(model, template, word_tokenize, 64, views)


def test_contexts_equal_the_plain_viewneti_contexts(backend, calibration):
    model = _model(calibration)
    prompt = _prompt(model, calibration)
    assert prompt.rows == 3 and prompt.object_token == "<object>" and "latent batch must be 3" in prompt.describe()
    bounded = P.contexts_for_prompt(backend, model, prompt)
    plain = ViewNetiContexts(backend, prompt.tokens.input_ids, model.view, prompt.tokens.token_ids["view"],
                             prompt.views.params, model.objects["<object>"], prompt.tokens.token_ids["object"])
    with torch.no_grad():
        for layer in (0, 6, 15):
            call = LayerCall(layer, COND, torch.full((3,), 500.0), torch.full((3,), 1.0), 3, 500.0)
            for a, b in zip(bounded.contexts(call), plain.contexts(call)):
                assert torch.equal(a, b)
    view_only = P.build_prompt(model, "{view}. A photo of a red car", word_tokenize, 64, prompt.views)
    provider = P.contexts_for_prompt(backend, model, view_only)
    assert provider.object_mapper is None and provider._bypass_positions.shape == (3, 1)


def test_cache_stays_within_its_budget(backend, calibration):
    model = _model(calibration)
    prompt = _prompt(model, calibration, keys="25")
    step = P.contexts_for_prompt(backend, model, prompt).step_bytes()
    assert step == 16 * 1 * (16 + 2) * 32 * 4  # 16 layers x 1 row x (T + 2 bypass rows) x D x fp32
    released = []
    provider = P.contexts_for_prompt(backend, model, prompt, max_cache_bytes=2 * step,
                                     on_release=lambda: released.append(True))
    reference = P.contexts_for_prompt(backend, model, prompt)
    schedule = [999.0, 666.0, 333.0, 1.0]
    with torch.no_grad():
        provider.prepare(schedule)
        assert provider.precomputed == 2 and provider.cache_bytes <= 2 * step
        for t in schedule:  # sampling order; later steps computed on arrival, the oldest dropped
            call = LayerCall(3, COND, torch.full((1,), t), torch.full((1,), 1.0), 1, t)
            for a, b in zip(provider.contexts(call), reference.contexts(call)):
                assert torch.equal(a, b)
            assert provider.cache_bytes <= 2 * step
    provider.release()
    assert released == [True] and provider.cache_bytes == 0


def test_check_batch(backend, calibration):
    model = _model(calibration)
    provider = P.contexts_for_prompt(backend, model, _prompt(model, calibration))
    provider.check_batch(3)
    with pytest.raises(ValueError, match="latent batch holds 2 latents but NVS ViewNeTI Apply was given 3 views: "
                                         "set the latent batch_size to 3"):
        provider.check_batch(2)
    single = P.contexts_for_prompt(backend, model, _prompt(model, calibration, keys="25"))
    single.check_batch(4)  # one view for any number of latents (seeds)


def test_object_token_choice(calibration):
    model = _model(calibration)
    model.objects["<scan33>"] = model.objects["<object>"]
    with pytest.raises(ValueError, match="object_token: the object mapper file holds 2 objects"):
        P.pick_object_token(model, "")
    with pytest.raises(ValueError, match="object_token: '<scan1>' is not in the object mapper file"):
        P.pick_object_token(model, "<scan1>")
    assert P.pick_object_token(model, "<scan33>") == "<scan33>"
