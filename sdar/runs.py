"""Many training runs (arms x seeds), in parallel subprocesses, and what they logged.

An *arm* is a name and a set of ``TrainConfig`` overrides on top of a base config (e.g. ``sdar`` =
``{"method": "sdar"}``, the placebo = ``{"method": "sdar", "skill_noise": 1.0}``). Each (arm, seed) trains
into ``OUT/<arm>-seed<k>/`` (``metrics.jsonl``, ``log.txt``, its config and checkpoint). With ``jobs > 1``
the runs are ``python -m sdar train`` subprocesses with ``threads`` CPU threads each, so two runs use two
cores; with ``jobs == 1`` they run one after another in this process. The tiny model's warm-up is built
once, before any run starts, so parallel runs never race on its cache.

A run directory that already holds a finished run of the same configuration (``base_config.json`` equal
to the run's config, ``metrics.jsonl`` ending with the final step's evaluation) is read, not retrained:
rerunning an interrupted ``compare`` or ``gate`` command trains only what is missing. ``fresh=True``
retrains everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .trainer import TrainConfig


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict = field(default_factory=dict)

    def config(self, base: TrainConfig, seed: int) -> TrainConfig:
        return replace(base, **self.overrides, seed=seed)


@dataclass
class Run:
    arm: str
    seed: int
    dir: Path
    wall_s: float
    metrics: list

    def evals(self, key: str = "eval/success") -> tuple:
        """(steps, values) of ``key`` over the run's evaluation records."""
        pts = [(r["step"], r[key]) for r in self.metrics if key in r]
        return [s for s, _ in pts], [v for _, v in pts]


def read_metrics(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def finished_run(cfg: TrainConfig, arm: str, run_dir: Path):
    """The :class:`Run` already in ``run_dir`` if it trained ``cfg`` to its last step, else None.

    Its wall time is the span from writing its config to the last metrics record (both written by the
    run itself)."""
    base, metrics_path = run_dir / "base_config.json", run_dir / "metrics.jsonl"
    if not (base.exists() and metrics_path.exists()):
        return None
    if json.loads(base.read_text()) != json.loads(json.dumps(asdict(cfg))):
        return None
    metrics = read_metrics(metrics_path)
    if not metrics or metrics[-1].get("step") != cfg.steps or "eval/success" not in metrics[-1]:
        return None
    wall_s = metrics_path.stat().st_mtime - base.stat().st_mtime
    return Run(arm, cfg.seed, run_dir, wall_s, metrics)


def run_one(cfg: TrainConfig, arm: str, run_dir: Path, threads: int, in_process: bool,
            fresh: bool = False) -> Run:
    """Train one configured run into ``run_dir`` (a fresh ``metrics.jsonl``), unless a finished run of the
    same configuration is already there and ``fresh`` is False."""
    if not fresh and (done := finished_run(cfg, arm, run_dir)) is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    base = run_dir / "base_config.json"
    base.unlink(missing_ok=True)     # written again below; a half-written run is never mistaken for done
    t0 = time.perf_counter()
    if in_process:
        from .trainer import train
        train(cfg, run_dir, progress=False, log=lambda m: None)
        base.write_text(json.dumps(asdict(cfg), indent=1))
    else:
        base.write_text(json.dumps(asdict(cfg), indent=1))
        cmd = [sys.executable, "-m", "sdar", "train", "--config", str(base), "--out", str(run_dir),
               "--threads", str(threads), "--no-progress"]
        with open(run_dir / "log.txt", "w") as logf:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"run {run_dir.name} failed (exit {rc}); see {run_dir / 'log.txt'}")
    return Run(arm, cfg.seed, run_dir, time.perf_counter() - t0, read_metrics(run_dir / "metrics.jsonl"))


def prepare_warmup(cfg: TrainConfig, log=None) -> None:
    """Build the tiny model's warm-up once, before parallel runs would each try to."""
    if cfg.model is None:
        from .models import ensure_tiny
        from .towers import Towers
        ensure_tiny(cfg.tiny_config(), Towers(cfg.towers_config()), cfg.history, cfg.cache_dir, log=log)


def run_grid(base: TrainConfig, arms, seeds, out, *, jobs: int = 2, threads: int = 1, progress=True,
             log=None, fresh: bool = False) -> list:
    """Every (arm, seed): ``seeds`` is a list of seed numbers. Returns the :class:`Run` list (arm-major).
    Finished runs of the same configuration already in ``out`` are reused unless ``fresh``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    prepare_warmup(base, log=log)
    todo = [(a, s) for a in arms for s in seeds]
    configs = [a.config(base, s) for a, s in todo]    # every config checked before anything runs
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="runs", dynamic_ncols=True)
    runs = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = [pool.submit(run_one, c, a.name, out / f"{a.name}-seed{s}", threads, jobs == 1, fresh)
                for (a, s), c in zip(todo, configs)]
        for f in futs:
            r = f.result()
            runs.append(r)
            if bar is not None:
                _, ev = r.evals()
                bar.update(1)
                bar.set_postfix(last=f"{r.arm}/{r.seed}", success=f"{ev[-1]:.2f}" if ev else "-")
    if bar is not None:
        bar.close()
    return runs
