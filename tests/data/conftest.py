"""Fixtures for the data tests: the real SNI sample beside the repo, the built-in tokenizer, tiny configs."""

from pathlib import Path

import pytest

from tagi_ds.config import apply_overrides
from tagi_ds.data.tokenizer import SentencePieceTokenizer
from tagi_ds.recipes import get_recipe

# CI clones the repo with ../shared beside it.
SNI_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sni_sample"


@pytest.fixture(scope="session")
def sni_sample() -> Path:
    if not (SNI_SAMPLE / "tasks").is_dir():
        pytest.skip(f"SNI sample not found at {SNI_SAMPLE}")
    return SNI_SAMPLE


@pytest.fixture(scope="session")
def tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer()


def make_cfg(recipe: str = "tiny", *sets: str):
    """A tiny recipe with ``key=value`` overrides."""
    return apply_overrides(get_recipe(recipe), list(sets))
