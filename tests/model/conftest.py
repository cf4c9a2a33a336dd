"""Fixtures for the model tests (helpers live in hf_twins.py)."""

import pytest
from hf_twins import CONFIGS


@pytest.fixture(params=list(CONFIGS))
def config_name(request):
    return request.param
