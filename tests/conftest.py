import pytest
import torch


@pytest.fixture
def one_thread():
    "These models are tiny: one thread is fastest, and immune to a machine busy with other test workers."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
