"""The StableMoE gate (Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture of Experts").

Per token x with id t: router logits s = W_g x (fp32), p = softmax(s). A light *distilled router*
maps the token id alone to expert logits: d(t) = W_d emb(t), emb a [V, `--stablemoe-distill-dim`]
table of its own (V = dictionary size), W_d: [E, dim].

stage 1 (num_updates < `--stablemoe-stage2-update`), training and evaluation:
    expert = argmax_e s_e, weight = sigmoid(s_expert) (the paper's gate value);
    balance loss: the Switch loss E * sum_e f_e * P_e on p (weighted by --moe-gate-loss-wt; the
    paper uses its own count-times-sigmoid form, we reuse the Switch one);
    distillation (Routing.extra_loss): `--stablemoe-distill-wt` * CE(d(t), expert), the stage-1
    choice as a fixed target, so only the distilled router learns from it.
stage 2 (num_updates >= `--stablemoe-stage2-update`):
    expert = frozen[t], where frozen = argmax_e d(t) for every t in the vocabulary, computed once
    when stage 2 starts and kept in a buffer: routing is a function of the token id only and no
    gradient or optimizer step (Adam momentum, weight decay) can reach it. weight =
    sigmoid(s_expert), so W_g still learns as the gate value; no balance loss, no distillation.
    The distilled router's parameters are tied into extra_loss with a factor 0 so that every
    parameter still takes part in backward (data-parallel reducers) with an exact zero gradient.

The stage follows the update counter that fairseq passes to `set_num_updates` before each step and
after loading a checkpoint; the frozen table and the flag saying it is filled are buffers, so a
checkpoint taken in stage 2 routes the same way in `fairseq-generate` (which sets no counter).
A gate in stage 2 stays there when the counter goes back below the switch (fine-tuning that restarts
the counter, or a larger --stablemoe-stage2-update on resume), unless --moe-rerun-schedules.
The paper's capacity factor is 2 (`--moe-capacity-factor 2`). Without a dictionary (a stand-alone
layer) the distilled router has 1024 rows and ids are taken modulo 1024.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from .base import Routing, fp32_linear, register_gate, router_z_loss, switch_balance_loss, token_mean
from ..host_flag import HostFlag
from ...option_values import require_finite
from .top_k import RouterGate

NO_DICTIONARY_ROWS = 1024


@dataclass
class StableMoEOptions(FairseqDataclass):
    stablemoe_stage2_update: int = field(
        default=10000,
        metadata={"help": "stablemoe gate: update from which the distilled router is frozen and routes (stage 2); "
                  "-1 = stay in stage 1 (default 10000)"},
    )
    stablemoe_distill_wt: float = field(
        default=1.0, metadata={"help": "stablemoe gate: weight of the stage-1 routing distillation loss (default 1.0)"}
    )
    stablemoe_distill_dim: int = field(
        default=32, metadata={"help": "stablemoe gate: embedding size of the distilled word-embedding router (default 32)"}
    )


@register_gate("stablemoe", options=StableMoEOptions)
class StableMoEGate(RouterGate):
    state_keys = (frozenset({"router.wg.weight", "distill_embed.weight", "distill_proj.weight", "frozen_table", "frozen"}),)
    state_shape_options = {"distill_embed.weight": ("--stablemoe-distill-dim", 1)}

    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        self.stage2_update = getattr(args, "stablemoe_stage2_update", 10000)
        self.distill_wt = getattr(args, "stablemoe_distill_wt", 1.0)
        self.rerun_schedule = getattr(args, "moe_rerun_schedules", False)
        dim = getattr(args, "stablemoe_distill_dim", 32)
        require_finite({"--stablemoe-distill-wt": self.distill_wt})
        if self.stage2_update < -1:
            raise ValueError(f"--stablemoe-stage2-update must be >= 0, or -1 for no stage 2, got {self.stage2_update}")
        if self.distill_wt < 0:
            raise ValueError(f"--stablemoe-distill-wt must be >= 0, got {self.distill_wt}")
        if dim < 1:
            raise ValueError(f"--stablemoe-distill-dim must be >= 1, got {dim}")
        self.vocab = len(dictionary) if dictionary is not None else NO_DICTIONARY_ROWS
        self.distill_embed = nn.Embedding(self.vocab, dim)
        nn.init.normal_(self.distill_embed.weight, std=dim ** -0.5)
        self.distill_proj = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("frozen_table", torch.zeros(self.vocab, dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(False))
        self._frozen_flag = HostFlag()

    @property
    def stage(self) -> int:
        return 2 if self._frozen_flag(self.frozen) else 1

    def set_num_updates(self, num_updates: int) -> None:
        stage2 = 0 <= self.stage2_update <= num_updates
        if stage2 and not bool(self.frozen):
            with torch.no_grad():
                self.frozen_table.copy_(self.distilled_logits(torch.arange(self.vocab, device=self.frozen_table.device)).argmax(-1))
            self.frozen.fill_(True)
        elif not stage2 and self.rerun_schedule:
            self.frozen.fill_(False)

    def state_for_logging(self):
        return {"phase": self.stage}

    def reset_schedule(self) -> None:
        self.frozen.fill_(False)

    def distilled_logits(self, token_ids: Tensor) -> Tensor:
        return fp32_linear(self.distill_embed(token_ids % self.vocab), self.distill_proj.weight)

    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        if token_ids is None:
            raise ValueError("--moe-gate stablemoe routes by token id, but this MoE layer was given no token ids")
        ids = token_ids.reshape(-1)
        logits = self.router(x)
        probs = logits.softmax(dim=-1)
        zero = logits.new_zeros(())
        if self.stage == 2:
            expert = self.frozen_table[ids % self.vocab]
            balance, z = zero, zero
            params = (self.distill_embed.weight, self.distill_proj.weight)
            extra = sum(p.float().sum() for p in params) * 0.0  # exact zero gradient, see docstring
        else:
            expert = logits.detach().argmax(dim=-1)
            balance = switch_balance_loss(probs, expert, self.num_experts, valid)
            z = router_z_loss(logits, valid)
            extra = self.distill_wt * self.distill_loss(ids, expert, valid)
        chosen = logits.gather(1, expert[:, None]).squeeze(1)
        weight = torch.sigmoid(chosen)
        return Routing(
            token_idx=torch.arange(x.shape[0], device=x.device),
            expert_idx=expert,
            weight=weight,
            priority=weight.detach(),
            rank=None,
            probs=probs,
            balance_loss=balance,
            z_loss=z,
            extra_loss=extra,
            valid=valid,
        )

    def distill_loss(self, ids: Tensor, expert: Tensor, valid) -> Tensor:
        """Cross-entropy of the distilled router against the stage-1 choice, mean over (valid) tokens."""
        if ids.numel() == 0:
            return self.distill_proj.weight.new_zeros((), dtype=torch.float)
        if valid is None:
            return F.cross_entropy(self.distilled_logits(ids), expert)
        return token_mean(F.cross_entropy(self.distilled_logits(ids), expert, reduction="none"), valid)
