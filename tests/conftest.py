"""Shared fixtures: tiny random-init Llama models, their tokenizer and a model folder, all instant
and offline (helpers in tinymodels.py and tiny_tokenizer.py)."""
import pytest

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
