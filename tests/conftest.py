import pytest

from cifarbench import data


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic10 + synthetic100 in the real CIFAR layout, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("data")
    data.write_synthetic("synthetic10", root, train_size=1000, test_size=500)
    data.write_synthetic("synthetic100", root, train_size=1000, test_size=500)
    return root
