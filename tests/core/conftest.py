"""One thread for torch and the core in these tests: the CI machine's 2 cores are shared."""

import pytest


@pytest.fixture(autouse=True)
def _single_threaded(single_threaded: None) -> None:
    """Every test here runs under the shared ``single_threaded`` fixture."""
