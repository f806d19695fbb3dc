"""The vocabulary-split schedule of the Triton engine (few rows: each row cut into stretches, partial
statistics combined per row) against the oracle, and the launch plan that picks it."""

import pytest
import torch

from helpers import check_against_oracle, make_case, run
from sdar_kernels import sdar_loss
from sdar_kernels.sdar_loss import launch

OPTIONS = {
    "sampled": {"distill": "sampled", "entropy_coef": 0.01, "kl_coef": 0.1},
    "reinforce": {"distill": "reinforce", "gate_beta": 2.0},
    "fkl": {"distill": "fkl", "distill_coef": 0.7, "temperature": 0.7},
    "rkl": {"distill": "rkl", "distill_coef": 0.7, "entropy_coef": 0.02},
    "jsd": {"distill": "jsd", "jsd_beta": 0.3, "distill_coef": 0.5, "temperature": 1.4},
}


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("mode", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_splits_match_the_oracle(splits, mode, reduction, device, monkeypatch):
    """V = 1031 in tiles of 64 logits: stretches that cross tiles, a ragged last stretch, a label in every
    stretch somewhere in the batch; masked rows hold NaN/inf."""
    monkeypatch.setenv("SDAR_KERNELS_SPLITS", str(splits))
    monkeypatch.setenv("SDAR_KERNELS_MAX_BLOCK_V", "64")
    case = make_case((2, 5), 1031, torch.bfloat16, device=device, advantages="seq", old_logprobs=True,
                     ref_logprobs=True, mask="empty_rows", nan_masked=True)
    options = {**OPTIONS[mode], "reduction": reduction, "backend": "triton"}
    check_against_oracle(run(sdar_loss, case, options), case, options)


@pytest.mark.parametrize("splits", [1, 4])
def test_splits_give_the_same_result_as_one_program_per_row(splits, device, monkeypatch):
    monkeypatch.setenv("SDAR_KERNELS_MAX_BLOCK_V", "128")
    case = make_case(6, 2053, device=device, advantages="token", old_logprobs=True, mask="empty_rows")
    options = {"distill": "fkl", "distill_coef": 1.0, "entropy_coef": 0.01, "backend": "triton"}
    monkeypatch.setenv("SDAR_KERNELS_SPLITS", "1")
    out1, g1 = run(sdar_loss, case, options)
    monkeypatch.setenv("SDAR_KERNELS_SPLITS", str(splits))
    out2, g2 = run(sdar_loss, case, options)
    torch.testing.assert_close(out2.loss, out1.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-8)


def test_launch_plan_splits_few_rows_on_a_gpu(monkeypatch):
    """N=64 rows on a 132-SM GPU: rows cut into stretches of whole tiles so that the N * S programs make one
    wave of ~4 per SM; N=8192: one program per row. On the CPU (the interpreter) there is nothing to fill."""
    monkeypatch.delenv("SDAR_KERNELS_SPLITS", raising=False)
    monkeypatch.delenv("SDAR_KERNELS_MAX_BLOCK_V", raising=False)
    gpu = 132   # SMs of an H100
    slots = 132 * launch.PROGRAMS_PER_SM
    for N in (1, 8, 64, 200):
        plan = launch.plan_launch(N, 151936, torch.bfloat16, gpu)
        assert plan.splits > 1 and plan.v_split % plan.block == 0, (N, plan)
        assert plan.v_split >= launch.MIN_TILES_PER_SPLIT * plan.block, (N, plan)
        assert (plan.splits - 1) * plan.v_split < 151936 <= plan.splits * plan.v_split, (N, plan)
        assert N * plan.splits <= slots, (N, plan)    # one wave
    assert launch.plan_launch(64, 151936, torch.bfloat16, gpu).splits >= 6
    assert launch.plan_launch(8192, 151936, torch.bfloat16, gpu).splits == 1
    assert launch.plan_launch(64, 151936, torch.bfloat16, None).splits == 1
    assert launch.plan_launch(4, 300, torch.bfloat16, gpu).splits == 1   # < 4 tiles per stretch: all overhead
