import numpy as np
import pytest


@pytest.fixture
def rng():
    """A generator seeded the same way in every test, so failures reproduce."""
    return np.random.default_rng(20261122)


@pytest.fixture(autouse=True, scope="session")
def _full_thread_count_whatever_the_load():
    """Tests choose their thread counts; cnnx.backoff must not lower them on a busy CI machine
    (tests/test_backoff.py tests it with a counter of its own)."""
    from cnnx import backoff

    saved, backoff.ENABLED = backoff.ENABLED, False
    yield
    backoff.ENABLED = saved


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorboard_server: starts a tensorboard server (deselect with -m 'not tensorboard_server')"
    )
