"""The recorded upstream cases (tests/fixtures/ps3_tiny/cases) reproduce."""
import pytest
from golden import CASES, MODEL_DIR, run_case

import ps3


@pytest.fixture(scope="module")
def vision():
    return ps3.PS3VisionModel.from_pretrained(MODEL_DIR)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case_matches_upstream(vision, path):
    run_case(vision, MODEL_DIR, path)
