import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def parallel():
    """A single-process megatron-core world (TP = PP = EP = 1) for the whole session."""
    from specbridge.runtime.parallel import init_parallel

    init_parallel(tp=1, pp=1, ep=1, seed=1234)
    yield


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")
