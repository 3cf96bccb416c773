"""Find and run the fenced code blocks of README.md and docs/*.md (the rules are in test_doc_blocks.py)."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mpvg_kernels

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python": "python", "bash": "bash"}
MARKER = re.compile(r"^<!--\s*doc-test:(?P<body>.*?)-->\s*$")
MARKER_KEYS = {"skip", "exempt", "timm", "setup", "args"}
# `# -> VALUE`: VALUE is the first word (a trailing ":", "," or ";" dropped), or the whole text in backticks
EXPECT = re.compile(r"#\s*->\s*(?:`(?P<quoted>[^`]*)`|(?P<word>\S+?)[:,;]?(?:\s|$))")
BLOCK_TIMEOUT_S = 180


@dataclass
class Block:
    """One fenced block: where it is, its language, its text and the doc-test marker above it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS


def parse_marker(text: str, where: str) -> dict[str, str]:
    """`skip reason="..."` -> {"skip": "", "reason": "..."}; unknown keys are an error naming them."""
    out: dict[str, str] = {}
    for word in shlex.split(text):
        key, eq, value = word.partition("=")
        if key not in MARKER_KEYS | {"reason"}:
            raise ValueError(f"{where}: unknown doc-test marker key {key!r} (known: {sorted(MARKER_KEYS)})")
        out[key] = value if eq else ""
    if ("skip" in out or "exempt" in out) and not out.get("reason"):
        raise ValueError(f'{where}: a doc-test skip/exempt marker needs reason="..."')
    return out


def find_blocks(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, with the marker on the line right above its fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: fence never closed")
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        where = f"{path.relative_to(ROOT)}:{i + 1}"
        mm = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        marker = parse_marker(mm.group("body"), where) if mm else {}
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", marker))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in find_blocks(p)]


def with_output_checks(code: str, where: str) -> str:
    """Turn each one-line expression statement ending in `# -> VALUE` into a check that str(value) == VALUE.

    The check function takes one line before the block, so error lines are the block's lines + 1.
    """
    lines = code.splitlines()
    for node in ast.parse(code).body:
        m = EXPECT.search(lines[node.end_lineno - 1])
        if not m:
            continue
        if not isinstance(node, ast.Expr) or node.lineno != node.end_lineno:
            raise ValueError(f"{where}: '# ->' must follow a one-line expression (line {node.lineno} of the block)")
        expr = ast.get_source_segment(code, node)
        want = m.group("quoted") if m.group("quoted") is not None else m.group("word")
        lines[node.lineno - 1] = f"__doc_check__({expr}, {want!r}, {node.lineno})"
    check = (
        "def __doc_check__(value, want, line): str(value) == want or __import__('sys').exit("
        f"f'{where}: line {{line}} of the block gives {{value!s}}, the doc says {{want}}')\n"
    )
    return check + "\n".join(lines) + "\n" if any("__doc_check__" in ln for ln in lines) else code


def package_root() -> str:
    """The directory this process imported mpvg_kernels from (the worktree, or site-packages in the timm tier)."""
    return str(Path(mpvg_kernels.__file__).resolve().parents[1])


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root(), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def run_in(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    """Run cmd in cwd; a non-zero exit or a timeout is an AssertionError quoting the output."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{what}: did not finish within {BLOCK_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        raise AssertionError(
            f"{what}: exit status {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def run_block(block: Block, tmp: Path, setup_cache: dict[str, Path], cache_root: Path) -> str:
    """Run one block in tmp (after its setup, if any) and return its stdout."""
    setup = block.marker.get("setup")
    if setup:
        if setup not in setup_cache:
            d = cache_root / f"setup{len(setup_cache)}"
            # a setup that extends a cached one ("A && B" after "A") starts from A's files and runs only B
            base = max((k for k in setup_cache if setup.startswith(k + " && ")), key=len, default=None)
            rest = setup
            if base is not None:
                shutil.copytree(setup_cache[base], d)
                rest = setup[len(base) + len(" && ") :]
            d.mkdir(parents=True, exist_ok=True)
            run_in(["bash", "-e", "-c", rest], d, f"{block.id} setup {setup!r}")
            setup_cache[setup] = d
        shutil.copytree(setup_cache[setup], tmp, dirs_exist_ok=True)
    args = shlex.split(block.marker.get("args", ""))
    if block.lang == "python":
        (tmp / "block.py").write_text(with_output_checks(block.code, block.id), encoding="utf-8")
        return run_in([sys.executable, "block.py", *args], tmp, block.id).stdout
    (tmp / "block.sh").write_text(block.code, encoding="utf-8")
    return run_in(["bash", "-e", "block.sh", *args], tmp, block.id).stdout
