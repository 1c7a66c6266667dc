import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random inputs in every test, yet the same ones when a test is rerun."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def num_threads():
    """Lets a test change torch.set_num_threads and puts it back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
