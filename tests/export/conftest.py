import pytest

from magistune.model_files import materialize_tiny


@pytest.fixture(scope="session")
def tiny_dir():
    return materialize_tiny("tiny-random")


@pytest.fixture(scope="session")
def vision_dir():
    return materialize_tiny("tiny-random-vision")
