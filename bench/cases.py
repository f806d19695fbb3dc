"""The named, model-shaped case registry every benchmark reads its shapes from (never hard-coded in scripts).

A case is one op at one shape, dtype and loss configuration. Vocabulary sizes are the real ones of the
model families SDAR is trained on; hidden sizes (fused-linear op) are those of the matching ~4-8B models.
Sets group cases for a machine class: ``quick`` / ``cpu`` for 2-core CPU runs, ``gpu`` for an 80 GB card.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Vocabulary and hidden size of the model families (config.json of the public checkpoints).
MODELS = {
    "qwen3": dict(V=151936, H=4096),     # Qwen3-8B (Qwen2.5-7B shares V=151936, H=3584)
    "llama3": dict(V=128256, H=4096),    # Llama-3/3.1-8B
    "gemma3": dict(V=262144, H=2560),    # Gemma-3-4B
    "tiny": dict(V=32000, H=256),        # CPU-sized stand-in with a Llama-2-like vocabulary
}

# Loss configurations (keyword arguments of sk.sdar_loss; which side inputs exist is in `inputs`).
CONFIGS = {
    # The released SDAR objective (the paper's values): GRPO dual clip + k3 KL + entropy + gated distill.
    "official": dict(gate_beta=5.0, distill_coef=0.01, distill="sampled", clip_low=0.2, clip_high=0.2,
                     clip_ratio_c=3.0, kl_coef=0.01, entropy_coef=0.001, temperature=1.0),
    # The same without the entropy bonus (entropy_coef = 0 is also verl's default); Liger-Kernel can
    # express every remaining term, so this is where it is compared.
    "no-entropy": dict(gate_beta=5.0, distill_coef=0.01, distill="sampled", clip_low=0.2, clip_high=0.2,
                       clip_ratio_c=3.0, kl_coef=0.01, entropy_coef=0.0, temperature=1.0),
}


@dataclass(frozen=True)
class Case:
    op: str                   # "sdar_loss" | "linear_sdar_loss"
    model: str                # key of MODELS
    N: int                    # tokens (rows)
    dtype: str = "bfloat16"   # logits / hidden dtype
    config: str = "official"  # key of CONFIGS
    V: int = 0                # 0: the model's vocabulary
    H: int = 0                # 0: the model's hidden size (fused-linear op only)
    tags: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if not self.V:
            object.__setattr__(self, "V", MODELS[self.model]["V"])
        if not self.H:
            object.__setattr__(self, "H", MODELS[self.model]["H"])

    @property
    def name(self) -> str:
        dt = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        n = f"{self.N // 1024}k" if self.N % 1024 == 0 else str(self.N)
        shape = f"N{n}-V{self.V}" + (f"-H{self.H}" if self.op == "linear_sdar_loss" else "")
        return f"{self.op}:{self.model}:{shape}:{dt}:{self.config}"

    @property
    def options(self) -> dict:
        return dict(CONFIGS[self.config])


def _grid(op, models, Ns, **kw):
    return [Case(op, m, n, **kw) for m in models for n in Ns]


# CPU, quick: under a minute on 2 cores with the correctness check (two V and two N for the plots).
QUICK = [
    Case("sdar_loss", "tiny", 128, V=16384, dtype="float32"),
    Case("sdar_loss", "tiny", 128, dtype="float32"),
    Case("sdar_loss", "tiny", 256, V=16384, dtype="float32"),
    Case("linear_sdar_loss", "tiny", 128, V=16384, dtype="float32"),
]

# CPU, full: real vocabularies at small token counts (minutes on 2 cores).
CPU = [
    *_grid("sdar_loss", ["tiny", "llama3", "qwen3"], [512], dtype="float32"),
    Case("sdar_loss", "qwen3", 256, dtype="float32"),
    Case("sdar_loss", "qwen3", 512, dtype="bfloat16"),
    Case("sdar_loss", "qwen3", 512, dtype="float32", config="no-entropy"),
    *_grid("linear_sdar_loss", ["tiny"], [512, 1024], dtype="float32"),
    Case("linear_sdar_loss", "tiny", 512, V=65536, dtype="float32"),
]

# GPU headline (gpu_check.sh): the three vocabularies at 8k tokens, the N sweep on Qwen, bf16.
GPU_HEADLINE = [
    *_grid("sdar_loss", ["llama3", "qwen3", "gemma3"], [8192]),
    *_grid("sdar_loss", ["qwen3"], [4096, 16384, 32768]),
    Case("sdar_loss", "qwen3", 8192, config="no-entropy"),
    *_grid("linear_sdar_loss", ["llama3", "qwen3", "gemma3"], [8192]),
    Case("linear_sdar_loss", "qwen3", 8192, config="no-entropy"),
]

# GPU full: token counts 1k-64k (the largest only fit the fused providers; others report OOM).
GPU = [
    *GPU_HEADLINE,
    *_grid("sdar_loss", ["qwen3"], [1024, 65536]),
    *_grid("sdar_loss", ["llama3", "gemma3"], [32768]),
    Case("sdar_loss", "qwen3", 8192, dtype="float32"),
    *_grid("linear_sdar_loss", ["qwen3"], [1024, 4096, 16384, 32768, 65536]),
]

SETS = {"quick": QUICK, "cpu": CPU, "gpu-headline": GPU_HEADLINE, "gpu": GPU}


def all_cases():
    seen = {}
    for cases in SETS.values():
        for c in cases:
            seen.setdefault(c.name, c)
    return seen


def get_case(name: str) -> Case:
    try:
        return all_cases()[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; see bench/cases.py") from None


def parse_case(name: str) -> Case:
    """A registry name, or an ad-hoc one in the same format (``op:model:N<n>-V<v>[-H<h>]:dtype:config``)."""
    if name in all_cases():
        return all_cases()[name]
    op, model, shape, dt, config = name.split(":")
    dims = dict((p[0], p[1:]) for p in shape.split("-"))
    n = dims["N"]
    N = int(n[:-1]) * 1024 if n.endswith("k") else int(n)
    dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dt]
    return Case(op, model, N, dtype=dtype, config=config, V=int(dims.get("V", 0)), H=int(dims.get("H", 0)))
