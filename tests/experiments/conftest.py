"""Shared fixtures of the experiment tests: a tiny random Llama as a local model directory."""

import pytest

from tests.support.tiny_llama import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random Llama as a Hugging Face directory, with a word-level tokenizer for Hamlet."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
