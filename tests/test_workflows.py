"""Every example workflow in workflows/ is valid for the pack's node definitions."""
from pathlib import Path

import pytest

from tests.conftest import load_pack
from tests.workflow_check import validate_workflow

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_there_are_workflows():
    assert WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid(path):
    assert validate_workflow(path, load_pack().NODE_CLASS_MAPPINGS) == []


def test_validator_catches_mistakes(tmp_path):
    import json

    good = json.loads(WORKFLOWS[0].read_text())
    mappings = load_pack().NODE_CLASS_MAPPINGS
    broken = json.loads(json.dumps(good))
    broken["nodes"][0]["type"] = "NVSDoesNotExist"
    bad_range = json.loads(json.dumps(good))
    orbit = next(n for n in bad_range["nodes"] if n["type"] == "NVSOrbitCameras")
    orbit["widgets_values"][0] = 0  # count below its minimum of 1
    bad_link = json.loads(json.dumps(good))
    bad_link["links"][0][5] = "IMAGE"
    for data, message in ((broken, "unknown type"), (bad_range, "below min"), (bad_link, "declared type")):
        path = tmp_path / "wf.json"
        path.write_text(json.dumps(data))
        assert any(message in e for e in validate_workflow(path, mappings)), message
