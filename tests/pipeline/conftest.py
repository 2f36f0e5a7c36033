"""The tiny pipeline run that several pipeline test files read (run once per session)."""

from pathlib import Path

import pytest

from tests.pipeline.support import run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "tiny"
    run("--output_dir", str(root))
    return root
