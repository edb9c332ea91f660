import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Model tests run on one thread: digests are compared across runs and processes,
    and the pipeline's ranks run single-threaded too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
