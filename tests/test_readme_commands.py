"""The commands the READMEs give leave `git status` clean: what they write goes to git-ignored places.

- `python -m bench` is run for real (one tiny case) in a scratch git copy of the checkout: by default it
  must write only into the ignored bench/results/local/, and `--record` must write into the tracked
  results (so the check can tell the two apart).
- Every other command is too slow to run here, so the paths they write are checked instead: every
  `--out` / `--results` / `--cache-dir` of the READMEs' shell blocks, and what installing and testing
  write (egg-info, caches), must be ignored by git.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import code_blocks, markdown_files

ROOT = Path(__file__).resolve().parent.parent
TINY_CASE = "sdar_loss:tiny:N16-V512:fp32:official"


def git(*args, cwd=ROOT, check=True):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def checkout_files():
    if shutil.which("git") is None or git("rev-parse", "--git-dir", check=False).returncode != 0:
        pytest.skip("not a git checkout")
    return git("ls-files", "--cached", "--others", "--exclude-standard").stdout.split()


def scratch_copy(files, dest):
    """The checkout's files (tracked and not ignored, as they are now) committed in a fresh repository."""
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "copy", cwd=dest)


def status(cwd):
    return git("status", "--porcelain", "--untracked-files=all", cwd=cwd).stdout.splitlines()


def run_bench(cwd, *extra):
    cmd = [sys.executable, "-m", "bench", "--no-check", "--in-process", "--budget", "0", "--case", TINY_CASE,
           "--provider", "eager", "--provider", "sdar-torch", *extra]
    env = dict(os.environ, MPLBACKEND="Agg")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def test_bench_writes_only_ignored_files_unless_asked_to_record(checkout_files, tmp_path):
    scratch_copy(checkout_files, tmp_path)
    assert status(tmp_path) == []

    run_bench(tmp_path)
    assert status(tmp_path) == [], "python -m bench modified the checkout"
    local = sorted(p.name for p in (tmp_path / "bench" / "results" / "local").iterdir())
    assert any(n.endswith(".csv") for n in local), local
    assert importlib.util.find_spec("matplotlib") is None or any(n.endswith(".png") for n in local), local

    run_bench(tmp_path, "--record")
    changed = status(tmp_path)
    assert changed and all(line[3:].startswith("bench/results/") for line in changed), changed


def test_record_and_results_are_exclusive():
    sys.path.insert(0, str(ROOT))
    from bench.run import main
    with pytest.raises(SystemExit):
        main(["--record", "--results", "somewhere", "--case", TINY_CASE])


def output_paths_of_readme_commands():
    """(file, path) for every relative --out / --results / --cache-dir in the Markdown's shell blocks."""
    found = []
    for md in markdown_files():
        for lang, _start, code in code_blocks(md):
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0]
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                for flag, value in zip(words, words[1:]):
                    if flag in ("--out", "--results", "--cache-dir") and not re.search(r"[$<>]", value) \
                            and not os.path.isabs(value):
                        found.append((md.relative_to(ROOT).as_posix(), value))
    return found


def test_readme_commands_write_only_into_ignored_paths(checkout_files):
    paths = output_paths_of_readme_commands()
    assert ("README.md", "runs/q") in paths, paths          # the parser sees the README's commands
    written = [p + "/metrics.jsonl" for _md, p in paths]
    written += ["bench/results/local/cpu.csv",             # python -m bench (default results)
                "sdar_kernels.egg-info/PKG-INFO",          # pip install -e .
                ".pytest_cache/README.md", "tests/__pycache__/x.pyc"]   # python -m pytest
    ignored = set(git("check-ignore", "--no-index", *written, check=False).stdout.split())
    assert set(written) <= ignored, sorted(set(written) - ignored)
