"""Vocabulary-parallel ops (tp_group=) on CPU with gloo: two processes, each holding half of the vocabulary,
against one process holding all of it. Every rank must get the same loss, per-token outputs and metrics as
the single-process call, and the gradient of its own shard must be that slice of the full gradient.

The processes are spawned by the test (torch.multiprocessing, a file rendezvous in a temporary directory,
loopback only); each runs every case of a table so that the start-up cost is paid once per backend.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from spawn import run_on_ranks

WORLD = 2


def _cases():
    """(id, op, shape, V, dtype, options, inputs kwargs) of every case; V is even (equal shards)."""
    out = []
    for distill in ("sampled", "reinforce", "fkl", "rkl", "jsd"):
        out.append((f"sdar-{distill}", "sdar_loss", (2, 5), 258, torch.float32,
                    {"distill": distill, "distill_coef": 0.5, "entropy_coef": 0.01, "kl_coef": 0.1,
                     "temperature": 0.8}, {}))
    out.append(("sdar-bf16-none-sliced", "sdar_loss", (2, 5), 1030, torch.bfloat16,
                {"distill": "rkl", "reduction": "none", "entropy_coef": 0.02}, {"sliced": True}))
    out.append(("sdar-inplace-seqmode", "sdar_loss", (3, 4), 514, torch.float32,
                {"distill": "fkl", "loss_agg_mode": "seq-mean-token-mean", "inplace_backward": True}, {}))
    out.append(("sdar-labels-on-one-shard", "sdar_loss", (2, 6), 130, torch.float32,
                {"distill": "jsd", "jsd_beta": 0.3, "entropy_coef": 0.01}, {"labels_low": True}))
    out.append(("sdar-teacher-logprobs", "sdar_loss", (2, 5), 98, torch.float32, {"gate_beta": 2.0},
                {"teacher": "logprobs"}))
    out.append(("sdar-neg-inf-and-nan-masked", "sdar_loss", (2, 7), 262, torch.float32,
                {"distill": "fkl", "entropy_coef": 0.01}, {"neg_inf": True}))
    out.append(("token-teacher", "token_logprobs", (2, 5), 258, torch.float32, {"temperature": 0.7}, {}))
    out.append(("token-bf16-sliced-inplace", "token_logprobs", (2, 5), 1030, torch.bfloat16,
                {"inplace_backward": True}, {"sliced": True}))
    out.append(("token-no-entropy-labels-on-one-shard", "token_logprobs", (3, 4), 130, torch.float32,
                {"entropy": False}, {"labels_low": True}))
    for distill in ("sampled", "rkl", "jsd"):
        out.append((f"linear-{distill}", "linear_sdar_loss", (2, 5), 130, torch.float32,
                    {"distill": distill, "distill_coef": 0.5, "entropy_coef": 0.01}, {}))
    out.append(("linear-none-chunks", "linear_sdar_loss", (3, 5), 66, torch.float32,
                {"distill": "fkl", "reduction": "none"}, {"chunk_rows": "4"}))
    out.append(("linear-token-chunks", "linear_token_logprobs", (3, 5), 66, torch.float32, {"temperature": 0.9},
                {"chunk_rows": "4"}))
    return out


CASES = _cases()


def _inputs(shape, V, dtype, seed, teacher="logits", sliced=False, labels_low=False, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    B, T = shape
    src = torch.randn(B, T + (1 if sliced else 0), V, generator=g) * 3
    logits = src[:, :-1] if sliced else src
    tz = logits + torch.randn(logits.shape, generator=g)
    labels = torch.randint(0, V // 2 if labels_low else V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    mask[-1, -1] = False
    if neg_inf:
        logits = logits.clone()
        logits[..., 7] = float("-inf")           # a banned word (the teacher allows it: fkl is +inf there)
        logits[~mask] = float("nan")
    kw = dict(mask=mask, advantages=torch.randn(B, generator=g), old_logprobs=-torch.rand(B, T, generator=g),
              ref_logprobs=-torch.rand(B, T, generator=g) * 2)
    if teacher == "logits":
        kw["teacher_logits"] = tz
    else:
        kw["teacher_logprobs"] = -torch.rand(B, T, generator=g) * 3
    return logits.to(dtype), labels, kw


H = 12


def _linear_inputs(logits, kw, seed):
    """hidden / weight / bias standing in for the logits (their shapes: [B, T, H], [V, H], [V])."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = logits.shape
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.1
    return hidden, weight, bias, {**{k: v for k, v in kw.items() if k != "teacher_logits"},
                                  "teacher_hidden": hidden + 0.3 * torch.randn(B, T, H, generator=g)}


def _run_linear(op, hidden, weight, bias, labels, kw, options, upstream):
    import sdar_kernels as sk
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    if op == "linear_sdar_loss":
        out = sk.linear_sdar_loss(h, w, labels, bias=b, **kw, **options)
        ((out.loss * upstream).sum() if out.loss.dim() else out.loss).backward()
    else:
        out = sk.linear_token_logprobs(h, w, labels, bias=b, mask=kw["mask"], teacher_hidden=kw["teacher_hidden"],
                                       **options)
        ((out.logprobs * upstream).sum() + out.entropy.sum()).backward()
    return out, (h.grad, w.grad, b.grad)


def _run(op, logits, labels, kw, options, upstream):
    import sdar_kernels as sk
    leaf = logits.detach().clone().requires_grad_(True)
    inp = leaf
    if options.get("inplace_backward"):
        inp = leaf * 1.0      # a non-leaf the op may overwrite
        inp.retain_grad()
    if op == "sdar_loss":
        out = sk.sdar_loss(inp, labels, **kw, **options)
        total = (out.loss * upstream).sum() if out.loss.dim() else out.loss
    else:
        out = sk.token_logprobs(inp, labels, mask=kw["mask"], teacher_logits=kw.get("teacher_logits"), **options)
        total = (out.logprobs * upstream).sum() + (out.entropy.sum() if out.entropy is not None else 0)
    total.backward()
    return out, (inp.grad if options.get("inplace_backward") else leaf.grad)


def _compare(op, tp, full):
    fields = ("loss", "logprobs", "entropy", "gate", "gap") if op == "sdar_loss" else \
        ("logprobs", "entropy", "teacher_logprobs")
    for f in fields:
        a, b = getattr(tp, f), getattr(full, f)
        assert (a is None) == (b is None), f
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, equal_nan=True, msg=f)
    for k, v in getattr(full, "metrics", {}).items():
        torch.testing.assert_close(tp.metrics[k], v, atol=2e-6, rtol=2e-5, equal_nan=True, msg=k)


def _worker(rank, world, backend, tmpdir):
    os.environ.setdefault("TRITON_INTERPRET", "1")    # CPU tensors: the Triton engine runs interpreted
    failures = []
    for i, (name, op, shape, V, dtype, options, extra) in enumerate(CASES):
        try:
            logits, labels, kw = _inputs(shape, V, dtype, seed=i,
                                         **{k: v for k, v in extra.items() if k != "chunk_rows"})
            options = {**options, "backend": backend}
            upstream = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
            Vs = V // WORLD
            shard = slice(rank * Vs, (rank + 1) * Vs)
            if op.startswith("linear_"):
                os.environ["SDAR_LINEAR_CHUNK_ROWS"] = extra.get("chunk_rows", "")
                hidden, weight, bias, lkw = _linear_inputs(logits, kw, seed=1000 + i)
                full, (gh, gw, gb) = _run_linear(op, hidden, weight, bias, labels, lkw, options, upstream)
                tp, (th, tw, tb) = _run_linear(op, hidden, weight[shard], bias[shard], labels, lkw,
                                               {**options, "tp_group": dist.group.WORLD}, upstream)
                _compare("sdar_loss" if op == "linear_sdar_loss" else "token_logprobs", tp, full)
                torch.testing.assert_close(th, gh, atol=2e-6, rtol=2e-5)
                torch.testing.assert_close(tw, gw[shard], atol=2e-6, rtol=2e-5)
                torch.testing.assert_close(tb, gb[shard], atol=2e-6, rtol=2e-5)
                continue
            full, g_full = _run(op, logits, labels, kw, options, upstream)
            kw_shard = dict(kw)
            if "teacher_logits" in kw:
                kw_shard["teacher_logits"] = kw["teacher_logits"][..., shard]
            tp, g_tp = _run(op, logits[..., shard], labels, kw_shard, {**options, "tp_group": dist.group.WORLD},
                            upstream)
            _compare(op, tp, full)
            tol = 1e-2 if dtype == torch.bfloat16 else 2e-6
            torch.testing.assert_close(g_tp, g_full[..., shard], atol=tol, rtol=tol, equal_nan=True)
        except Exception:
            failures.append(f"rank {rank} {backend} {name}:\n{traceback.format_exc()}")
    with open(os.path.join(tmpdir, f"failures-{rank}.txt"), "w") as f:
        f.write("\n".join(failures))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_matches_one_process(backend, tmp_path):
    # tests/spawn.py: one thread per process, and the group left through DataParallel.close (a plain
    # destroy could abort the process at exit: see that method for why)
    run_on_ranks(_worker, WORLD, tmp_path, backend, str(tmp_path))
    failures = "".join((tmp_path / f"failures-{r}.txt").read_text() for r in range(WORLD))
    assert not failures, failures
