"""Docs that run: every ```python and ```bash block of README.md and docs/*.md runs here, and the numbers the docs
quote are computed and compared. A block that errors, or an output that differs from what the doc states, fails.

How each fenced block is treated (the code: tests/docs/doc_blocks.py):

- ```python: written to block.py in a fresh temporary directory and run there as `python block.py` in a fresh
  interpreter (this one's executable), with the directory mpvg_kernels is imported from first on PYTHONPATH
  (the repository; run the suite with PYTHONPATH=$PWD from a worktree).
- ```bash: written to block.sh in a fresh temporary directory and run there with `bash -e block.sh`, this
  interpreter's bin directory (the venv's: `mpvg`, `python`) first on PATH, the same PYTHONPATH.
  Both inherit the environment, with OMP_NUM_THREADS=1 unless it is set and MPLBACKEND=Agg.
- Any other fence (no language: sample output, formulas, layouts) is not run. The layout in docs/design.md is
  compared with `git ls-files mpvg_kernels` by test_design_layout_names_every_module.
- Stated outputs: in a python block, a one-line expression followed by `# -> VALUE` is checked: str(its value)
  must be VALUE: the first word after `->` (a trailing ":", "," or ";" dropped) or the text in backticks, e.g.
  `len(list_models())   # -> 14 models`, or `pooled.shape   # -> 'torch.Size([2, 192])'` with backticks for quotes.
- Markers: an HTML comment on the line right above the opening fence, keys combined in one comment:
  `<!-- doc-test: skip reason="..." -->`    not run here; pytest lists the skip with the reason (`-ra`).
  `<!-- doc-test: exempt reason="..." -->`  the README's two top commands (CI runs command 2 itself: .ci/run).
  `<!-- doc-test: timm -->`                 needs timm: runs where timm imports (the timm tier,
                                            tests/timm/test_doc_blocks_timm.py), skipped here with that reason.
  `<!-- doc-test: setup="CMD" -->`          bash CMD runs first (once per session per CMD; its files are copied into
                                            the block's directory), e.g. a 1-epoch `mpvg train` for the checkpoint.
  `<!-- doc-test: args="A B" -->`           arguments of `python block.py` / `bash block.sh`.
  A marker with an unknown key, or skip/exempt without a reason, fails collection.
- Blocks that cannot run in CI (a GPU, downloads, data sets not on disk, minutes of training, torchrun on many
  GPUs) carry skip with the reason. No environment variable shrinks a block unless the doc says so.

Budget: the whole module runs in a few minutes on 2 shared cores (measured: see the commit message that last
changed it); each block has BLOCK_TIMEOUT_S.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import DOC_FILES, ROOT, all_blocks, block_env, run_block, with_output_checks

BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.runs]
HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.fixture(scope="session")
def setup_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    return {}, tmp_path_factory.mktemp("doc_setup")


def skip_reason(block) -> str | None:
    """Why this block does not run in this environment, or None."""
    m = block.marker
    if "skip" in m or "exempt" in m:
        return f"{block.id}: {m['reason']}"
    if "timm" in m and not HAS_TIMM:
        return f"{block.id}: needs timm: runs in the timm tier (tests/timm/test_doc_blocks_timm.py)"
    return None


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block, tmp_path: Path, setup_cache) -> None:
    reason = skip_reason(block)
    if reason:
        pytest.skip(reason)
    run_block(block, tmp_path, *setup_cache)


def test_blocks_found_and_markers_are_placed() -> None:
    """Every runnable language is spelled as the collector expects, and no marker floats above a non-run block."""
    langs = {b.lang for b in BLOCKS}
    assert langs <= {"", "python", "bash"}, f"unexpected fence languages {langs - {'', 'python', 'bash'}}"
    stray = [b.id for b in BLOCKS if b.marker and not b.runs]
    assert not stray, f"doc-test markers above blocks that never run: {stray}"
    placed = {(b.path, b.line - 1) for b in BLOCKS if b.marker}
    floating = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in DOC_FILES
        for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if ln.lstrip().startswith("<!--") and "doc-test:" in ln and (p, i) not in placed
    ]
    assert not floating, f"doc-test markers not on the line right above a fence: {floating}"


def test_output_check_rewrites_and_fails_on_drift(tmp_path: Path) -> None:
    """The `# -> VALUE` rule itself: a right value passes, a wrong one fails naming both."""
    good = with_output_checks("x = [1, 2]\nlen(x)   # -> 2: two\nx   # -> `[1, 2]` the list\n", "t.md:1")
    bad = with_output_checks("x = [1, 2]\nlen(x)   # -> 3\n", "t.md:1")
    (tmp_path / "good.py").write_text(good)
    (tmp_path / "bad.py").write_text(bad)
    assert subprocess.run([sys.executable, "good.py"], cwd=tmp_path).returncode == 0
    p = subprocess.run([sys.executable, "bad.py"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "gives 2, the doc says 3" in p.stderr


def test_design_layout_names_every_module() -> None:
    """docs/design.md's layout names every module of the package (`git ls-files mpvg_kernels`)."""
    files = subprocess.run(
        ["git", "ls-files", "mpvg_kernels"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not files:
        pytest.skip(reason="the package files are listed with `git ls-files`, and this tree is not a git checkout")
    design = ROOT / "docs" / "design.md"
    layout = next(b.code for b in all_blocks() if b.path == design and b.code.startswith("mpvg_kernels/ops/"))
    missing = [
        f
        for f in files
        if f.endswith(".py")
        and not f.endswith("/__init__.py")
        and "/recipes/" not in f
        and not re.search(rf"\b{re.escape(Path(f).stem)}\b", layout)
    ]
    assert not missing, f"docs/design.md layout does not name {missing}"


# Numbers the docs quote and where they come from. Each entry: (doc, the exact text quoted, how it is checked).
# Counts computed here are compared; thresholds must be the very ones the named test asserts.
E2E = ROOT / "tests" / "train" / "test_pipeline_e2e.py"
THRESHOLDS = [
    ("README.md", "digits to >= 95% top-1", E2E, 'assert s["top1"] >= 95.0'),
    ("README.md", "at least 95 %", E2E, 'assert s["top1"] >= 95.0'),
    ("docs/pipelines.md", "at least 95 %", E2E, 'assert s["top1"] >= 95.0'),
    ("docs/design.md", "to >= 95 % top-1, every mode to >= 80 % (chance is 10 %)", E2E, 'assert s["top1"] >= 80.0'),
    ("docs/models.md", "`vit_digits` trains to >= 95% test accuracy", E2E, 'assert s["top1"] >= 95.0'),
    ("docs/pipelines.md", "digits default >= 95% top-1", E2E, 'assert s["top1"] >= 95.0'),
    (
        "docs/design.md",
        "all partial buffers together cost at most 25 % of it "
        "(`tests/ops/test_triton_compile.py::test_backward_partials_are_small`)",
        ROOT / "tests" / "ops" / "test_triton_compile.py",
        "assert ratio <= 0.25",
    ),
    ("README.md", "within 0.0015 M", ROOT / "tests" / "models" / "test_swin.py", "< 0.0015"),
]


@pytest.mark.parametrize(("doc", "quoted", "test_file", "assertion"), THRESHOLDS, ids=[t[1] for t in THRESHOLDS])
def test_quoted_threshold_is_the_tested_one(doc: str, quoted: str, test_file: Path, assertion: str) -> None:
    text = " ".join((ROOT / doc).read_text(encoding="utf-8").split())
    assert quoted in text, f"{doc} no longer says {quoted!r}: update THRESHOLDS with the doc"
    assert assertion in test_file.read_text(encoding="utf-8"), f"{test_file.name} no longer asserts {assertion!r}"


def _collected(test_file: str, env: dict[str, str]) -> int:
    """How many tests `pytest --collect-only -q FILE` collects (the command the README names)."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", test_file],
        cwd=ROOT,
        env={**block_env(), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    ).stdout
    m = re.search(r"^(\d+) tests? collected", out, re.M)
    assert m, out[-2000:]
    return int(m.group(1))


COUNTS = [
    (
        "| 180 checks in one test (`TRITON_INTERPRET=1 python -m pytest --collect-only -q "
        "tests/ops/triton_interp_checks.py`) |",
        "tests/ops/triton_interp_checks.py",
        {"TRITON_INTERPRET": "1"},
    ),
    (
        "| 382 (`python -m pytest --collect-only -q tests/ops/test_triton_compile.py`) |",
        "tests/ops/test_triton_compile.py",
        {},
    ),
]


@pytest.mark.parametrize(("quoted", "test_file", "env"), COUNTS, ids=[c[1] for c in COUNTS])
def test_readme_test_counts(quoted: str, test_file: str, env: dict[str, str]) -> None:
    """README's tier table: each count is what the command quoted beside it collects."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(reason="the counted Triton test files import triton, which is not installed here "
                    "(the [test] extra has it)")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert quoted in readme, f"README.md no longer says {quoted!r}: update COUNTS with the README"
    assert _collected(test_file, env) == int(re.search(r"\d+", quoted).group())


def test_models_md_quotes_mpvg_params_output() -> None:
    """docs/models.md's parameter tables are `mpvg params`' output, line for line (every count, every model)."""
    out = subprocess.run(
        [sys.executable, "-m", "mpvg_kernels", "params"],
        cwd=ROOT,
        env=block_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    doc = (ROOT / "docs" / "models.md").read_text(encoding="utf-8").splitlines()
    start = doc.index("`mpvg params` at this commit:") + 1
    end = next(i for i in range(start, len(doc)) if doc[i].startswith(("How the differences arise", "#")))
    quoted = [ln for ln in doc[start:end] if ln.strip()]
    printed = [ln for ln in out.splitlines() if ln.strip()]
    assert len(printed) > 100 and quoted == printed, "docs/models.md differs from `mpvg params`: paste its output"
