"""nodes/host.py: the ComfyUI glue works with the host's modules and falls back without them."""
import sys
import types
from importlib import import_module

import pytest
import torch

from tests.conftest import load_pack

pack = load_pack()
host = import_module(f"{pack.__name__}.nodes.host")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")


class Interrupt(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """Minimal stand-ins for comfy.utils, comfy.model_management and folder_paths."""
    state = {"interrupt": False, "updates": []}

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["updates"].append((value, total))

    def throw_exception_if_processing_interrupted():
        if state["interrupt"]:
            raise Interrupt("interrupted by the user")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_fp16 = lambda device=None: False
    mm.soft_empty_cache = lambda force=False: None
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.folder_names_and_paths = {"nvs_vivid": (["/extra/vivid"], set())}
    folder_paths.get_folder_paths = lambda name: folder_paths.folder_names_and_paths[name][0]
    folder_paths.get_filename_list = lambda name: ["a.safetensors"]
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    folder_paths.get_input_directory = lambda: str(tmp_path / "input")
    comfy.utils, comfy.model_management = utils, mm
    for name, module in {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
                         "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    state["folder_paths"] = folder_paths
    return state


def test_progress_reports_to_comfy_and_stops_on_interrupt(fake_comfy):
    make = host.progress_factory()
    bar = make(3, "test")
    bar.update()
    bar.update()
    assert fake_comfy["updates"] == [(1, 3), (2, 3)]
    fake_comfy["interrupt"] = True
    with pytest.raises(Interrupt):
        bar.update()


def test_model_folders_are_registered_with_extensions_and_keep_user_paths(fake_comfy, tmp_path):
    host.register_model_folders()
    table = fake_comfy["folder_paths"].folder_names_and_paths
    paths, extensions = table["nvs_vivid"]
    assert paths[0] == str(tmp_path / "models" / "nvs" / "vivid") and "/extra/vivid" in paths
    assert ".safetensors" in extensions and ".json" not in extensions
    assert set(host.METHOD_FOLDERS) <= {k[len("nvs_"):] for k in table}
    assert host.output_directory() == str(tmp_path / "output")


def test_dtype_choice():
    assert host.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert host.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert host.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        host.resolve_dtype("fp8", torch.device("cpu"))


def test_fallbacks_without_comfyui(monkeypatch, tmp_path):
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path))
    assert not host.comfy_available()
    bar = host.progress_factory()(2, "x")
    assert isinstance(bar, progress_mod.Progress)
    bar.update()
    bar.close()
    (tmp_path / "vivid" / "sub").mkdir(parents=True)
    (tmp_path / "vivid" / "sub" / "net.safetensors").write_bytes(b"")
    (tmp_path / "vivid" / "net.json").write_text("{}")
    assert host.list_model_files("vivid") == ["sub/net.safetensors"]
    assert host.model_path("vivid", "sub/net.safetensors").endswith("net.safetensors")
    with pytest.raises(FileNotFoundError, match="models/nvs/vivid"):
        host.model_path("vivid", "missing.safetensors")
    assert host.compute_device().type in ("cpu", "cuda")


def test_progress_interrupt_without_host():
    stop = {"now": False}
    bar = progress_mod.Progress(5, "loop", should_stop=lambda: stop["now"])
    bar.update()
    stop["now"] = True
    with pytest.raises(progress_mod.Interrupted, match="loop interrupted at step 1/5"):
        bar.check()
