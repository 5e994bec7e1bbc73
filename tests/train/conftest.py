import pytest

from train_helpers import make_lm


@pytest.fixture
def lm():
    return make_lm()
