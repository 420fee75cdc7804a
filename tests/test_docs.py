"""Every ```python block of README.md and docs/*.md runs as it is written.

Each block runs in a fresh namespace with a temporary folder as the working directory, so a block
must define (or import) every name it uses. A block that cannot run here (it needs a GPU, a dataset
such as /data/imagenet, or a long run) is marked in the markdown with ``<!-- no-test -->`` on the
line before its opening fence; a block that uses CUDA is also left out on a machine without a GPU.
Most blocks must run: marking is for the exceptions.
"""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
MIN_RUN_FRACTION = 0.75
# Blocks known to fail for a reason outside this file, by (file, a line of the block): each entry
# says what its file needs; the test is an xfail, not strict, so fixing the block is all it takes.
KNOWN_BROKEN: dict = {}


def python_blocks(path: Path):
    """``(line of the opening fence, code, marked no-test)`` of every ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if re.match(r"^\s*```python\s*$", lines[i]):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            before = next((ln.strip() for ln in reversed(lines[:start - 1]) if ln.strip()), "")
            blocks.append((start, "\n".join(body) + "\n", before == NO_TEST))
        i += 1
    return blocks


BLOCKS = [(str(path.relative_to(ROOT)), line, code, marked)
          for path in DOCS for line, code, marked in python_blocks(path)]


def _needs_gpu(code: str) -> bool:
    return bool(re.search(r"\bcuda\b", code)) and not torch.cuda.is_available()


def _known_broken(name: str, code: str) -> str:
    return next((why for (file, line), why in KNOWN_BROKEN.items()
                 if file == name and line in code), "")


def _param(name, line, code, marked):
    marks = []
    why = _known_broken(name, code)
    if why:
        marks.append(pytest.mark.xfail(reason=f"{name}: {why}", strict=False))
    return pytest.param(name, line, code, marked, id=f"{name}:{line}", marks=marks)


@pytest.fixture
def one_thread_in_tmp(tmp_path, monkeypatch):
    from butterfly.kernels import cpu

    cpu.load_extension()  # a first build is not the block's time
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, line, code, marked", [_param(*b) for b in BLOCKS])
def test_block_runs(name, line, code, marked, one_thread_in_tmp):
    if marked:
        pytest.skip(f"marked {NO_TEST}")
    if _needs_gpu(code):
        pytest.skip("uses CUDA; no GPU here")
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__main__"})


def test_most_blocks_run():
    runnable = [b for b in BLOCKS if not b[3] and not _needs_gpu(b[2])]
    assert len(BLOCKS) >= 10, f"found only {len(BLOCKS)} python blocks"
    assert len(runnable) >= MIN_RUN_FRACTION * len(BLOCKS), (
        f"only {len(runnable)} of {len(BLOCKS)} python blocks run; mark {NO_TEST} only what "
        "needs a GPU, a dataset or a long run")


def test_block_parser(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\na = 1\n```\n\n<!-- no-test -->\n```python\nb = 2\n```\n"
                   "```bash\nls\n```\n")
    assert python_blocks(doc) == [(2, "a = 1\n", False), (7, "b = 2\n", True)]
