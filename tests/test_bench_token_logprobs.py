"""bench/token_logprobs.py: every provider it times computes the same trainer loss and gradient (checked
before any number is trusted), at a small shape."""

import pytest
import torch

from bench.token_logprobs import PROVIDERS, TokenCase, make_inputs, unavailable


CASES = [TokenCase("token_logprobs", 37, 1001), TokenCase("token_logprobs", 37, 1001, config="lp"),
         TokenCase("linear_token_logprobs", 37, 1001, 24)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_providers_agree(case):
    inp = make_inputs(case, "cpu")
    targets = [inp["logits"]] if case.op == "token_logprobs" else [inp["hidden"], inp["weight"]]
    for t in targets:
        t.requires_grad_(True)
    results = {}
    for name, fn in PROVIDERS.items():
        if unavailable(name, case, "cpu"):
            continue
        loss = fn(inp, case)
        results[name] = (loss.detach(), torch.autograd.grad(loss, targets))
    assert {"eager", "sdar-torch"} <= set(results)
    ref_loss, ref_grads = results["eager"]
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-4, msg=name)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=name)
