"""Golden-fixture handlers, one module per method folder of ``$NVS_GOLDEN_DIR``.

Each module ``tests/golden/<method>.py`` defines ``HANDLERS``: a dict from a case ``kind`` (or
``"name:<case name>"`` for one case that needs its own code) to ``handler(case, method_dir)``, which
loads the fixture through the users' loaders and asserts within the case's tolerance.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

Handler = Callable[[dict, Path], None]


def lookup(method: str, case: dict) -> Optional[Handler]:
    try:
        module = importlib.import_module(f"tests.golden.{method}")
    except ModuleNotFoundError as exc:
        if exc.name != f"tests.golden.{method}":
            raise
        return None
    handlers = getattr(module, "HANDLERS", {})
    return handlers.get(f"name:{case['name']}") or handlers.get(case.get("kind", ""))
