"""The documentation a user reads is checked like code.

- Every ```python block of the project's Markdown (README.md, docs/, the op and package READMEs) runs as
  written on a CPU, in order, as a user would paste them: one fresh interpreter per file, the blocks of
  a file sharing one namespace (a later block may use names an earlier one defined). Blocks that need a
  GPU or a checkpoint are marked ```bash / ```text by the docs, so they are not run.
- Every relative link and #anchor in the Markdown resolves inside the repository.
- No file refers to design notes that live outside the repository.
- The API reference names every public name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"build", "dist", "runs", "node_modules", "__pycache__"}
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    """The project's Markdown: everything below the root but hidden folders, virtual environments and
    build or run outputs (git-ignored, never part of a checkout)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                             and not d.endswith(".egg-info") and "venv" not in d
                             and not (Path(dirpath) / d).relative_to(ROOT).as_posix().startswith("bench/results/local"))
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".md")]
    return found


def code_blocks(path):
    """[(language, first line number, code)] of the fenced blocks of a Markdown file."""
    blocks, lang, start, indent, lines = [], None, 0, "", []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, start, indent, lines = m.group(2).lower(), no + 1, m.group(1), []
        elif lang is not None and m and not m.group(2):
            blocks.append((lang, start, "\n".join(x[len(indent):] if x.startswith(indent) else x for x in lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path}: unclosed code fence opened at line {start - 1}"
    return blocks


def python_blocks(path):
    return [(start, code) for lang, start, code in code_blocks(path) if lang in ("python", "py")]


FILES_WITH_PYTHON = [p for p in markdown_files() if python_blocks(p)]

RUNNER = r"""
import json, sys, traceback
path, blocks = sys.argv[1], json.load(open(sys.argv[2]))
namespace = {"__name__": "__main__"}
for start, code in blocks:
    try:
        exec(compile(code, f"{path}:block at line {start}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"FAILED: the python block of {path} starting at line {start}")
print(f"ran {len(blocks)} blocks")
"""


def test_the_docs_have_runnable_examples():
    names = {p.relative_to(ROOT).as_posix() for p in FILES_WITH_PYTHON}
    assert {"README.md", "docs/api.md", "sdar_kernels/linear_sdar_loss/README.md"} <= names, names
    assert len(python_blocks(ROOT / "README.md")) >= 3


@pytest.mark.parametrize("path", FILES_WITH_PYTHON, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_as_written(path, tmp_path):
    blocks = python_blocks(path)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    # as a user runs them: the default backend (the torch path on CPU), no interpreter switch, no display,
    # in a scratch folder so that nothing a block writes lands in the checkout
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MPLBACKEND"] = "Agg"
    p = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(path.relative_to(ROOT)),
                        str(tmp_path / "blocks.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    in_code = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        a = github_anchor(line.lstrip("#"))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(path):
    """Link targets outside code blocks and inline code."""
    text, in_code = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            text.append(re.sub(r"`[^`]*`", "", line))
    return [a or b for a, b in LINK.findall("\n".join(text))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(path):
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z+.-]*:", target):          # http(s):, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with that anchor)")
    assert not bad, f"{path.relative_to(ROOT)}: " + ", ".join(bad)


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if (ROOT / n).is_file() and not n.endswith((".png", ".csv"))]


def test_no_file_cites_design_notes_outside_the_repository():
    # the project documents itself (docs/, the op READMEs); notes kept outside the repository are
    # unreachable for a user, so no file may send them there
    pattern = re.compile(r"shared/design|\bLOSS\.md\b|\bCONVENTIONS\.md\b|\bGPU\.md\b")
    this = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{no}: {line.strip()}" for p in tracked_text_files() if p != this
            for no, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_api_reference_names_every_public_name():
    import inspect

    import sdar
    import sdar_kernels
    from sdar_kernels.sdar_loss.options import DISTILL_MODES, LOSS_AGG_MODES

    text = (ROOT / "docs" / "api.md").read_text()
    public = [n for n in sdar_kernels.__all__ if n != "__version__"] + list(sdar_kernels.reference.__all__)
    public += ["SDARConfig", "SDARLoss", "LinearSDARLoss", "lm_head_inputs", "LMHeadInputs", "lm_head_weight"]
    public += list(sdar_kernels.METRIC_NAMES)
    missing = [n for n in public if n not in text]
    assert not missing, f"docs/api.md does not mention {missing}"
    assert sdar.hf.lm_head_inputs is not None       # reachable from `import sdar`, as documented
    for fn in (sdar_kernels.sdar_loss, sdar_kernels.linear_sdar_loss):
        undocumented = [a for a in inspect.signature(fn).parameters if f"`{a}`" not in text]
        assert not undocumented, f"docs/api.md does not document {fn.__name__}'s {undocumented}"
    for value in LOSS_AGG_MODES + DISTILL_MODES:
        assert f'`"{value}"`' in text, value
