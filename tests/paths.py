"""Locations of the read-only reference data the tests use."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NVS_SHARED_DIR", ROOT.parent / "shared"))
GOLDEN_DIR = Path(os.environ.get("NVS_GOLDEN_DIR", SHARED / "golden"))
