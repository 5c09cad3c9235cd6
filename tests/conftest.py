import pytest
import torch


@pytest.fixture
def one_thread():
    "These models are tiny: one thread is fastest, and immune to a machine busy with other test workers."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


try:
    from hypothesis import HealthCheck, settings
    # Property tests draw small inputs; on a machine busy with other work, drawing them can be slow. That is the
    # machine, not the code: never fail a test for it (the examples and their checks stay the same).
    settings.register_profile('lesson9', deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile('lesson9')
except ImportError: pass
