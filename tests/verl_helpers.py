"""Random verl micro-batches in verl's own no-padding layout, and the stub engine its step runs on.

Sequences are packed (prompt + response, jagged): the model's logits are [total_nnz, V] over every packed
position, log-probs / entropies are nested per sequence, and verl's ``no_padding_2_padding`` cuts the
response positions out of them (the logit at position i predicts token i + 1).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.dataset.dataset_utils import DatasetPadMode


@dataclass
class Packed:
    logits: torch.Tensor          # [nnz, V] leaf: the model's packed logits
    input_ids: torch.Tensor       # [nnz]
    cu_seqlens: torch.Tensor      # [B + 1]
    positions: torch.Tensor       # [B, R] packed position whose logit scores response token j (clamped on padding)
    data: TensorDict              # verl's micro-batch (prompts, responses, masks, old/ref log-probs, teacher)

    def nested(self, values):
        return torch.nested.nested_tensor_from_jagged(values, self.cu_seqlens)

    @property
    def rolled(self):
        return torch.roll(self.input_ids, -1)

    def response_view(self):
        """(response logits [B, R, V] gathered from the packed logits, labels [B, R]) for sdar_loss."""
        return self.logits[self.positions], self.rolled[self.positions]


def make_packed(prompt_lens, resp_lens, V, *, seed=0, holes=True, empty=(), global_counts=None):
    """A micro-batch; ``empty``: sequences whose whole response is masked; ``global_counts``:
    (batch_num_tokens, global_batch_size, dp_size) or None (local counts)."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(prompt_lens), max(resp_lens)
    lens = [p + r for p, r in zip(prompt_lens, resp_lens)]
    cu = torch.tensor([0] + lens).cumsum(0)
    nnz = int(cu[-1])
    ids = torch.randint(0, V, (nnz,), generator=g)
    logits = (torch.randn(nnz, V, generator=g) * 2).requires_grad_(True)
    j = torch.arange(R)
    r = torch.tensor(resp_lens)
    in_resp = j[None] < r[:, None]
    mask = in_resp & (torch.rand(B, R, generator=g) < 0.85 if holes else in_resp)
    mask[list(empty)] = False
    positions = (cu[1:, None] - r[:, None] - 1 + j[None]).clamp(0, nnz - 1)
    positions = torch.where(in_resp, positions, 0)

    with torch.no_grad():
        lp = torch.log_softmax(logits, -1).gather(-1, torch.roll(ids, -1)[:, None]).squeeze(-1)
        teacher_lp = torch.log_softmax(logits + torch.randn(nnz, V, generator=g), -1).gather(
            -1, torch.roll(ids, -1)[:, None])                                  # [nnz, 1], verl's layout
    resp_lp = lp[positions]
    adv = torch.randn(B, generator=g)[:, None].expand(B, R).clone()
    prompts = [ids[int(cu[b]): int(cu[b]) + p] for b, p in enumerate(prompt_lens)]
    responses = [ids[int(cu[b + 1]) - rr: int(cu[b + 1])] for b, rr in enumerate(resp_lens)]
    data = TensorDict({
        "prompts": torch.nested.as_nested_tensor(prompts, layout=torch.jagged),
        "responses": torch.nested.as_nested_tensor(responses, layout=torch.jagged),
        "response_mask": mask.to(torch.int64),
        "old_log_probs": torch.where(mask, resp_lp + 0.5 * torch.randn(B, R, generator=g), 0.0),
        "ref_log_prob": torch.where(mask, resp_lp + 1.5 * torch.randn(B, R, generator=g), 0.0),
        "advantages": adv,
        "teacher_logprobs": torch.nested.nested_tensor_from_jagged(teacher_lp, cu),
    }, batch_size=[B])
    tokens, seqs, dp = global_counts if global_counts is not None else (None, None, 1)
    tu.assign_non_tensor_data(data, "dp_size", dp)
    tu.assign_non_tensor_data(data, "batch_num_tokens", tokens)
    tu.assign_non_tensor_data(data, "global_batch_size", seqs)
    return Packed(logits=logits, input_ids=ids, cu_seqlens=cu, positions=positions, data=data)


def stub_engine():
    """The attributes FSDPEngineWithLMHead.prepare_model_outputs reads, without a model or a process group."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine
    stub = SimpleNamespace(
        engine_config=SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False),
        compute_entropy_from_logits=verl_F.entropy_from_logits, use_ulysses_sp=False)
    stub._gather_and_unpad_packed = types.MethodType(FSDPEngine._gather_and_unpad_packed, stub)
    return stub


def engine_step(prepare, packed, *, temperature=1.0, calculate_entropy=True, pad=0):
    """Run an engine's ``prepare_model_outputs`` on the packed logits (plus ``pad`` rows of packing pad)."""
    V = packed.logits.shape[-1]
    mb = TensorDict({"input_ids": packed.nested(packed.input_ids)}, batch_size=[len(packed.cu_seqlens) - 1])
    tu.assign_non_tensor_data(mb, "use_remove_padding", True)
    tu.assign_non_tensor_data(mb, "pad_mode", DatasetPadMode.NO_PADDING)
    tu.assign_non_tensor_data(mb, "calculate_entropy", calculate_entropy)
    logits = torch.cat([packed.logits, torch.zeros(pad, V)]) if pad else packed.logits
    ids = torch.cat([packed.input_ids, torch.zeros(pad, dtype=torch.long)])
    n = ids.shape[0]
    output_args = {"input_ids_rmpad_rolled": torch.roll(ids, -1), "temperature_rmpad": torch.full((n,), temperature),
                   "pad_size": pad, "temperature_is_one": temperature == 1.0}
    return prepare(stub_engine(), SimpleNamespace(logits=logits.unsqueeze(0)), output_args, mb, None)
