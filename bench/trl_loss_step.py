"""Peak memory and time of one GRPO loss step (forward + backward) in TRL's GRPOTrainer vs SDARGRPOTrainer:
``python -m bench.trl_loss_step [--vocab 32000] [--batch 8] [--completion 256] [--hidden 256]``.

The loss step is ``trainer._compute_loss(model, inputs)`` plus ``backward()`` on a synthetic batch with the
shapes of a generation batch (no generation, no reward): the part of a step the log-prob head changes.
Each variant runs in a fresh process; the peak is the process's high-water RSS over what was live
before the step (bench/harness.py), so model, optimizer-free parameters and inputs are not counted.

Variants: ``trl`` (TRL 1.16's own GRPOTrainer: its chunked fused LM head), ``sdar-logits`` and
``sdar-linear`` (SDARGRPOTrainer, head="logits" / "linear"), each with the distillation off, and
``sdar-*-distill`` with it on (teacher log-probs given, as once per generation batch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from . import harness

VARIANTS = ("trl", "sdar-logits", "sdar-linear", "sdar-logits-distill", "sdar-linear-distill")


def build(variant, vocab, hidden, layers, tmp):
    import warnings

    import transformers
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from sdar import SDARConfig
    from sdar.integrations.trl import SDARGRPOTrainer
    from sdar.models import build_tiny_tokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden // 4, max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(config)
    args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=8, num_generations=8, report_to="none",
                      use_cpu=True, max_completion_length=4096, loss_type="dapo", beta=0.0, bf16=False)
    data = Dataset.from_dict({"prompt": ["task"] * 8, "privileged": ["skill"] * 8})
    if variant == "trl":
        return GRPOTrainer(model, lambda completions, **k: [0.0] * len(completions), args=args,
                           train_dataset=data, processing_class=tok)
    head = "linear" if "linear" in variant else "logits"
    coef = 0.01 if variant.endswith("distill") else 0.0
    return SDARGRPOTrainer(model, lambda completions, **k: [0.0] * len(completions), args=args,
                           train_dataset=data, processing_class=tok, head=head,
                           sdar_config=SDARConfig(distill_coef=coef))


def inputs(vocab, batch, completion, prompt=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cmask = torch.ones(batch, completion, dtype=torch.long)
    cmask[batch // 2:, completion * 3 // 4:] = 0            # some shorter completions
    out = dict(prompt_ids=torch.randint(3, vocab, (batch, prompt), generator=g),
               prompt_mask=torch.ones(batch, prompt, dtype=torch.long),
               completion_ids=torch.randint(3, vocab, (batch, completion), generator=g), completion_mask=cmask,
               advantages=torch.randn(batch, generator=g), num_items_in_batch=cmask.sum().float())
    out["sdar_teacher_logps"] = -torch.rand(batch, completion, generator=g) * 3
    return out


def measure(variant, a):
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(variant, a.vocab, a.hidden, a.layers, tmp)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inp = inputs(a.vocab, a.batch, a.completion)

        def step():
            loss = trainer._compute_loss(trainer.model, inp)
            loss.backward()
            trainer.model.zero_grad(set_to_none=True)
            return loss.detach()

        step()                                     # warm-up (lazy init, first-touch pages)
        peak = harness.peak_extra_bytes(step, "cpu")
        ms = harness.time_ms(step, "cpu", warmup=False, budget_s=a.budget)
    return dict(variant=variant, peak_mb=peak / 2 ** 20, ms=ms[0], ms_p20=ms[1], ms_p80=ms[2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--variant", action="append", choices=VARIANTS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.variant[0], a)))
        return 0
    env = harness.environment("cpu")
    print(f"{env['device']}, torch {env['torch']}, {env['date']}, git {env['git_sha']}; V={a.vocab} "
          f"H={a.hidden} layers={a.layers} B={a.batch} completion={a.completion} fp32 (loss step: fwd + bwd)",
          flush=True)
    for variant in a.variant or VARIANTS:
        cmd = [sys.executable, "-m", "bench.trl_loss_step", "--one", "--variant", variant]
        cmd += [f"--{k}={getattr(a, k)}" for k in ("vocab", "hidden", "layers", "batch", "completion", "budget")]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.ROOT)
        if out.returncode != 0:
            print(f"{variant:22s} error: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:22s} peak {r['peak_mb']:8.1f} MB   {r['ms']:8.1f} ms "
              f"({r['ms_p20']:.1f}-{r['ms_p80']:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
