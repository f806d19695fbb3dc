"""Random, realistic inputs for one case, built directly on the device.

Logits are N(0, 2^2) (a peaked but not one-hot distribution); the teacher is the student plus noise
(same model, privileged context), so the gate takes values on both sides of 0.5. Sampled labels are
uniform; old/ref log-probs are the true student log-probs plus a little noise, so the PPO ratio and the
k3 term sit in their normal range. 10% of the tokens are masked.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _logprobs(row_logits, labels, N, chunk_rows):
    """log p(y) of each row in fp32, chunk by chunk (row_logits(a, b) gives rows a:b)."""
    out = torch.empty(N, dtype=torch.float32, device=labels.device)
    for a in range(0, N, chunk_rows):
        z = row_logits(a, min(N, a + chunk_rows)).float()
        out[a:a + z.shape[0]] = z.gather(1, labels[a:a + z.shape[0], None]).squeeze(1) - torch.logsumexp(z, -1)
    return out


def make_inputs(case, device, seed=0, dtype=None):
    """Inputs of ``case`` on ``device``; ``dtype`` overrides the case's (the correctness check uses fp32)."""
    dt = dtype or DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    N, V, H = case.N, case.V, case.H

    def randn(*shape, scale=1.0):  # made in the target dtype: no fp32 [N, V] temporary at 64k x 262k
        return torch.randn(*shape, generator=g, device=device, dtype=dt).mul_(scale)

    labels = torch.randint(0, V, (N,), generator=g, device=device)
    inp = dict(labels=labels)
    chunk = max(1, (1 << 24) // V)
    if case.op == "sdar_loss":
        inp["logits"] = randn(N, V, scale=2.0)
        inp["teacher_logits"] = randn(N, V, scale=0.5).add_(inp["logits"])
        logp = _logprobs(lambda a, b: inp["logits"][a:b], labels, N, chunk)
    else:
        inp["hidden"] = randn(N, H)
        inp["weight"] = randn(V, H, scale=2.0 / H ** 0.5)
        inp["teacher_hidden"] = randn(N, H, scale=0.3).add_(inp["hidden"])
        logp = _logprobs(lambda a, b: inp["hidden"][a:b] @ inp["weight"].t(), labels, N, chunk)
    noise = torch.randn(2, N, generator=g, device=device)
    inp["old_logprobs"] = logp + 0.05 * noise[0]
    inp["ref_logprobs"] = logp + 0.2 * noise[1]
    inp["advantages"] = torch.randn(N, generator=g, device=device)
    inp["mask"] = torch.rand(N, generator=g, device=device) > 0.1
    return inp


def grad_targets(inp, op):
    """The tensors the loss is differentiated with respect to."""
    return [inp["logits"]] if op == "sdar_loss" else [inp["hidden"], inp["weight"]]
