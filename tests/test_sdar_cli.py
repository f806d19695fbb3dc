"""``python -m sdar``: the quick paths, help text for every flag, one-line errors, the warm-up cache."""

import argparse
import json
import sys

import pytest
import torch

from sdar.cli import INSTALL_HINT, build_parser, config_from_args, main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cli-cache"))


def test_cli_train_quick(tmp_path, cache, capsys):
    out = tmp_path / "run"
    # --warmup-steps 20 keeps this test short (the real --quick builds a 100-step warm-up)
    assert main(["train", "--quick", "--out", str(out), "--cache-dir", cache, "--warmup-steps", "20",
                 "--no-progress"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "eval/success" in recs[-1] and "eval/teacher_success" in recs[-1]
    assert (out / "checkpoint" / "config.json").exists() and (out / "config.json").exists()
    assert '"eval/success"' in capsys.readouterr().out


def test_cli_compare_quick_is_a_smoke_test(tmp_path, cache, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--methods", "grpo,sdar", "--out", str(out), "--cache-dir", cache,
                 "--warmup-steps", "20", "--no-progress"]) == 0
    smoke = (out / "smoke.md").read_text()
    assert smoke.startswith("SMOKE TEST") and "no ranking" in smoke and "+-" not in smoke
    assert not (out / "results.md").exists() and not (out / "results.png").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "grpo-seed0", "grpo-seed1", "sdar-seed0", "sdar-seed1"]
    assert "SMOKE TEST" in capsys.readouterr().out


def all_actions(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from ((name, x) for x in sub._actions)


def test_every_flag_has_help_text():
    missing = [(cmd, a.option_strings) for cmd, a in all_actions(build_parser())
               if a.option_strings and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing
    seeds = [a.help for cmd, a in all_actions(build_parser()) if "--seeds" in a.option_strings]
    assert len(seeds) == 2 and all("a count" in h for h in seeds)


def test_warmup_cache_default_is_the_same_with_and_without_quick():
    p = build_parser()
    for argv in (["train"], ["train", "--quick", "--out", "x"], ["compare", "--quick", "--out", "y"]):
        assert config_from_args(p.parse_args(argv)).cache_dir is None, argv   # -> $SDAR_CACHE or ~/.cache/sdar


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0] and "--device cpu" in err[0]


def test_missing_training_extra_is_one_line(tmp_path, cache, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)     # `import transformers` now fails
    assert main(["train", "--quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_HINT in err[0]


@pytest.mark.parametrize("argv,name", [(["compare", "--methods", "grpo,ppo"], "methods"),
                                       (["compare", "--seeds", "0"], "seeds"),
                                       (["gate", "--noises", "0.5"], "noises"),
                                       (["gate", "--forms", "kl"], "forms"),
                                       (["train", "--lr", "-1"], "lr")])
def test_cli_errors_name_the_argument(argv, name, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]


def test_unknown_choice_is_an_argparse_error():
    with pytest.raises(SystemExit):
        main(["train", "--method", "ppo"])
