import os

import pytest
from hypothesis import HealthCheck, settings

from pool import WorkerPool

# "ci": reproducible and within minutes on 2 cores; "thorough": explores more.
#   HYPOTHESIS_PROFILE=thorough python -m pytest tests
settings.register_profile(
    "ci", derandomize=True, max_examples=int(os.environ.get("ZEROSHARD_EXAMPLES", "250")),
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=600, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pool():
    workers = WorkerPool()
    yield workers
    workers.shutdown()
