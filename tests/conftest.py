import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def parallel():
    """A single-process megatron-core world (TP = PP = EP = 1), (re)initialised for each test that asks."""
    from specbridge.runtime.parallel import init_parallel

    return init_parallel(tp=1, pp=1, ep=1, seed=1234)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")
