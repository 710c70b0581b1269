"""Shared fixtures: tiny random-init Llama models, their tokenizer and a model folder, all instant
and offline (helpers in tinymodels.py and tiny_tokenizer.py)."""
import pytest
from hypothesis import HealthCheck, settings

from tinymodels import save_tiny_folder, tiny_llama

pytest_plugins = ["cli_cases"]  # the CLI failure cases' fixtures: prev (a finished run), untouched


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_tokenizer():
    from tiny_tokenizer import make_tiny_tokenizer
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """One tiny model folder for the whole session (tests only read it)."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-model"))


# Hypothesis budgets (tests/test_fuzz.py): a few examples per property in `make test`, many in
# `make fuzz` (`pytest --hypothesis-profile=fuzz`). No deadline: two CPUs shared by parallel jobs
# make single-example timings meaningless.
settings.register_profile("default", max_examples=30, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
