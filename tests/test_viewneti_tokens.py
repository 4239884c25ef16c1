"""ViewNeTI view tokens, calibration folders and the camera normalisation."""
import pytest
import torch

from nvs_core.viewneti import camera_tokens as ct
from nvs_core.viewneti.loading import ViewNetiModel
from nvs_core.viewneti.mapper import ViewNetiMapper
from tests.paths import GOLDEN_DIR

CAL18 = GOLDEN_DIR / "viewneti" / "cal18_synthetic"
CAM0 = [[2607.429996, -3.844898, 1498.178098, -533936.661373],
        [-192.076910, 2862.552532, 681.798177, 23434.686572],
        [-0.241605, -0.030951, 0.969881, 22.540121]]
CAM0_TOKEN = ("<view_dtu12d_cam0_2607p4299_-3p8449_1498p1781_-533936p6875_-192p0769_2862p5525_681p7982_"
              "23434p6875_-0p2416_-0p0310_0p9699_22p5401>")


@pytest.mark.parametrize("value,text", [
    (2607.429996, "2607p4299"), (-533936.661373, "-533936p6875"), (1.0, "1"), (-3.0, "-3"), (0.0, "0"),
    (-0.0, "0"), (8388609.0, "8388609"), (-2.5, "-2p5000"), (1.03125, "1p0312"), (0.15625, "0p1562"),
    (0.99995, "0p9999"), (-0.00001, "-0p0000"), (-0.00005, "-0p0000"), (1e-4, "0p0001"), (-1e-4, "-0p0001"),
    (123456.789, "123456p7891"),
])
def test_numbers_are_written_from_their_float32_value(value, text):
    P = torch.zeros(12)
    P[0] = value
    token = ct.format_dtu_view_token(P, 7)
    assert token.split("_")[3] == text
    parsed = ct.parse_dtu_view_token(token).values[0]
    assert parsed.item() == torch.tensor(float(text.replace("p", ".")), dtype=torch.float32).item()
    if text.startswith("-0p0000"):
        assert torch.signbit(parsed)


def test_token_round_trip():
    token = ct.format_dtu_view_token(torch.tensor(CAM0), 0)
    assert token == CAM0_TOKEN
    parsed = ct.parse_dtu_view_token(token, int_key=True)
    assert parsed.key == 0 and parsed.values.dtype == torch.float32
    assert ct.format_dtu_view_token(parsed.values, parsed.key) == token  # parsing is a fixed point
    # The mapper sees the rounded numbers, not the raw matrix.
    assert parsed.values[0].item() == pytest.approx(2607.4299, abs=1e-4)
    assert ct.parse_dtu_view_tokens([token, token]).shape == (2, 12)


def test_token_errors():
    with pytest.raises(ValueError, match="not a DTU view token"):
        ct.parse_dtu_view_token("<view_dtu12d_cam0_1_2_3>")
    with pytest.raises(ValueError, match="not an integer"):
        ct.parse_dtu_view_token(ct.format_dtu_view_token(torch.ones(12)), int_key=True)  # key NULL
    assert ct.parse_dtu_view_token(ct.format_dtu_view_token(torch.ones(12))).key == "NULL"
    with pytest.raises(ValueError, match="cannot be part of a view token"):
        ct.format_dtu_view_token(torch.ones(12), "a_b")
    with pytest.raises(ValueError, match="12 numbers"):
        ct.format_dtu_view_token(torch.ones(3, 3))
    with pytest.raises(ValueError, match="cannot be written"):
        ct.format_dtu_view_token(torch.full((12,), float("nan")))


def _write_calibration(folder, count=4, skip=None):
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, count + 1):
        if n == skip:
            continue
        P = torch.tensor(CAM0, dtype=torch.float64) * (1 + 0.01 * n)
        lines = [" ".join(f"{v:.6f}" for v in row) for row in P.tolist()]
        (folder / f"pos_{n:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_calibration_folder_and_range(tmp_path):
    folder = _write_calibration(tmp_path / "Calibration" / "cal18")
    (folder / "notes.txt").write_text("not a camera")
    calib = ct.DTUCalibration.from_folder(tmp_path, count=4)  # the SampleSet root is accepted too
    assert calib.keys == [0, 1, 2, 3] and calib.projections.dtype == torch.float32
    rng = calib.camera_range()
    assert torch.equal(rng.mins, calib.projections.reshape(4, 12).min(0).values)
    normalised = rng.normalize_tokens(calib.tokens())
    # Tokens are rounded to 4 decimals but the range is not, so values may overshoot [-1, 1] a little.
    assert normalised.shape == (4, 12) and normalised.abs().max() <= 1.1
    # Given as 24 numbers, the range is the same.
    again = ct.DTUCameraRange.from_numbers(rng.to_numbers())
    assert torch.equal(again.mins, rng.mins) and torch.equal(again.maxs, rng.maxs)
    assert calib.token(2) == calib.tokens()[2]
    with pytest.raises(KeyError, match="camera key 9 is not in the DTU calibration"):
        calib.projection(9)


def test_calibration_errors_name_the_file(tmp_path):
    folder = _write_calibration(tmp_path / "cal18", count=5, skip=3)
    with pytest.raises(FileNotFoundError, match="missing DTU calibration file pos_003.txt"):
        ct.DTUCalibration.from_folder(folder, count=5)
    with pytest.raises(FileNotFoundError, match="pos_001.txt"):
        ct.DTUCameraRange.from_calibration_folder(tmp_path / "nowhere")
    (folder / "pos_003.txt").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match=r"pos_003.txt: expected 3 lines of 4 numbers"):
        ct.DTUCalibration.from_folder(folder, count=5)


def test_range_errors():
    with pytest.raises(ValueError, match="24 numbers"):
        ct.DTUCameraRange.from_numbers([0.0] * 12)
    with pytest.raises(ValueError, match="no extent for entry P01"):
        ct.DTUCameraRange.from_numbers([0.0] * 12 + [1.0, 0.0] + [1.0] * 10)
    with pytest.raises(ValueError, match="rows of 12"):
        ct.DTUCameraRange.from_numbers([0.0] * 12 + [1.0] * 12).normalize(torch.zeros(3))


def test_model_without_a_camera_range_says_what_to_give():
    view = ViewNetiMapper([0.03, 2.0] + [0.5] * 12, camera_representation="dtu-12d")
    model = ViewNetiModel(view, {}, {})
    with pytest.raises(ValueError, match="DTU calibration folder"):
        model.view_inputs([CAM0_TOKEN])
    model.view_range = ct.DTUCameraRange.from_numbers([-1e7] * 12 + [1e7] * 12)
    assert model.view_inputs([CAM0_TOKEN]).shape == (1, 12)
    with pytest.raises(ValueError, match="do not match"):
        model.view_inputs(["<view_10_20_1p5>"])


@pytest.mark.skipif(not CAL18.is_dir(), reason=f"golden calibration set not found at {CAL18}")
def test_golden_calibration_set_reads_64_cameras():
    calib = ct.DTUCalibration.from_folder(CAL18)
    assert len(calib) == 64 and calib.tokens()[0] == CAM0_TOKEN


def test_spherical_tokens_and_range():
    token = ct.format_spherical_view_token(60.0, 12.5, 1.2)
    assert token == "<view_60_12p50_1p20>"
    assert ct.parse_spherical_view_token(token) == (60.0, 12.5, 1.2)
    with pytest.raises(ValueError, match="not a spherical view token"):
        ct.parse_spherical_view_token(CAM0_TOKEN)

    phi_only = ct.SphericalViewRange.from_tokens(["<view_60_0_1>", "<view_60_90_1>", "<view_60_45_1>"])
    assert phi_only.degrees_of_freedom == "phi"
    assert phi_only.normalize_tokens(["<view_60_45_1>", "<view_60_180_1>"]).flatten().tolist() == [0.0, 3.0]

    both = ct.SphericalViewRange.from_tokens(["<view_30_0_1>", "<view_90_90_1>"])
    assert both.degrees_of_freedom == "theta-phi"
    assert both.normalize_tokens(["<view_60_45_1>"]).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="training view tokens"):
        ct.SphericalViewRange.from_tokens([])
