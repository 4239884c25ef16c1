"""Golden parity runner: one test per case of every ``<method>/cases.json`` under NVS_GOLDEN_DIR.

New cases in an existing schema run with no code change; a case kind without a handler is
skipped with the reason (its method is not implemented yet).
"""
import json

import pytest

from tests.paths import GOLDEN_DIR
from tests.golden import lookup


def _golden_params():
    if not GOLDEN_DIR.is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"no golden fixtures at {GOLDEN_DIR}"),
                             id="no-golden-dir")]
    params = []
    for cases_file in sorted(GOLDEN_DIR.glob("*/cases.json")):
        method = cases_file.parent.name
        spec = json.loads(cases_file.read_text())
        cases = spec["cases"] if isinstance(spec, dict) else spec
        for case in cases:
            params.append(pytest.param(method, case, id=f"{method}-{case['name']}"))
    return params


@pytest.mark.parametrize("method,case", _golden_params())
def test_golden_case(method, case):
    handler = lookup(method, case)
    if handler is None:
        pytest.skip(f"{method}: no handler for case kind {case.get('kind')!r} (method not implemented yet)")
    handler(case, GOLDEN_DIR / method)
