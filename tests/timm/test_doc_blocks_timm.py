"""The timm tier of tests/docs: the doc blocks marked `<!-- doc-test: timm -->` run here, where timm imports.

The rules and the collector are in tests/docs/test_doc_blocks.py and tests/docs/doc_blocks.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))

from doc_blocks import all_blocks, run_block  # noqa: E402

TIMM_BLOCKS = [b for b in all_blocks() if b.runs and "timm" in b.marker]


@pytest.fixture(scope="session")
def timm_setup_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    return {}, tmp_path_factory.mktemp("doc_setup_timm")


def test_timm_blocks_are_found() -> None:
    assert TIMM_BLOCKS, "no doc block is marked <!-- doc-test: timm -->"


@pytest.mark.parametrize("block", TIMM_BLOCKS, ids=[b.id for b in TIMM_BLOCKS])
def test_timm_doc_block_runs(block, tmp_path: Path, timm_setup_cache) -> None:
    if "skip" in block.marker:
        pytest.skip(reason=f"{block.id}: {block.marker['reason']}")
    run_block(block, tmp_path, *timm_setup_cache)
