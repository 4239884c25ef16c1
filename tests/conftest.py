import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.paths import SHARED  # noqa: E402

# Tiny models: a second thread only adds hand-off latency (seconds per call on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared reference folder not found at {SHARED}")
    return SHARED

PACK_NAME = "comfyui_nvs_pack"


def load_pack():
    """Import the repository the way ComfyUI does: its folder as a package with relative imports."""
    import importlib.util

    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()
