"""The embedded model, loaded once for the explain view tests (64×64 images, 16×16 latents)."""

from __future__ import annotations

import pytest

from nijimi.pipelines.pipeline import Pipeline, load


@pytest.fixture(scope="session")
def embedded() -> Pipeline:
    return load("embedded")
