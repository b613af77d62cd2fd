import numpy as np
import pytest


@pytest.fixture
def rng():
    """A generator seeded the same way in every test, so failures reproduce."""
    return np.random.default_rng(20261122)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorboard_server: starts a tensorboard server (deselect with -m 'not tensorboard_server')"
    )
