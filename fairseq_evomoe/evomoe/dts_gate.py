"""The Dense-To-Sparse gate (DTS) of EvoMoE (Nie et al., arXiv:2112.14397).

Per token x, logits l = W_g x (fp32), p = softmax(l), g ~ Gumbel(0, 1) per token and expert.

soft phase (training, num_updates < H):
    y = softmax((l + g) / tau)
    `--dts-sparsity threshold` (the paper's rule): the token goes to every expert e with
    y_e > threshold; high tau -> y near uniform -> all E experts; as tau falls y sharpens and fewer
    pass (how many depends on the router's logit scale as much as on tau).
    `--dts-sparsity scheduled`: the batch keeps round(k(t) * S) assignments, k(t) going from
    `--dts-k-start` (default E) to 1 over the anneal updates: each token's largest y, then the
    batch's largest remaining y. The mean number of experts per token is k(t) whatever the logits.
    Either way the largest y always passes, optionally only the `dts_max_experts` largest; weight
    p_e (default) or y_e (`--dts-combine-weights gumbel`), optionally renormalised over the selected
    experts. Nothing is dropped: capacity is unlimited.
hard phase (training, num_updates >= H):
    top-1 by argmax(l) (`--dts-hard-routing argmax`, the default: as evaluation routes;
    `--moe-router-jitter` adds Switch's input jitter) or by the Gumbel-max sample argmax(l + g)
    (`sample`, the authors'),
    weight p of that expert (`--dts-hard-combine-weights softmax`) or its Gumbel-softmax weight y
    at the current temperature (`gumbel`, as the authors' code with Gumbel combine weights);
    capacity as configured. On steps that collect statistics the gate reports hard_eval_agree_pct,
    the share of tokens whose training expert is argmax(l), the expert evaluation gives them, and
    counts the tokens for which the soft rule, at the same noise and schedule, would not select
    exactly that one expert (more experts, or, with argmax routing, another one; `switch_changed`,
    logged as moe_switch_changed_pct): at the switch, the share of tokens whose routing the switch
    changes (capacity drops aside, which moe_tokens_dropped_pct shows).
evaluation / generation:
    top-1 = argmax(l), weight p, no noise, nothing dropped. (`eval_routing`, for diagnosis only:
    "sample" routes by the training rule of the current phase, noise included, and "softmax" gives
    every expert its weight p; scripts/evaluate_routing.py compares the three.)
balance loss:
    E * sum_e me_e * ce_e; me_e = mean over tokens of the combine weight of e (0 where unselected),
    ce_e = fraction of tokens that selected e (a token may select several), both over the real
    tokens: padding rows (`valid` False, where padding stays in place) select nothing and count for
    nothing.

tau and the phase come from `EvoMoESchedule` (schedule.py), a pure function of the update
counter that fairseq pushes into every module through `set_num_updates`. The schedule's position
(`schedule_position`, in checkpoints) never goes back below the one a loaded checkpoint had reached,
so fine-tuning that restarts the counter keeps the routing the model was trained with (a gate that
reached top-1 stays top-1, its temperature never rises), unless --moe-rerun-schedules.
"""

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from ..moe.gates.base import Routing, register_gate, router_z_loss, token_mean
from ..moe.gates.dense import every_expert_routing
from ..moe.gates.top_k import RouterGate, gumbel_noise_like
from .saved_schedule import saved_update_counts
from .schedule import EvoMoESchedule, Phase

COMBINE_WEIGHTS = ("softmax", "gumbel")
SPARSITY_MODES = ("threshold", "scheduled")
HARD_ROUTING = ("argmax", "sample")  # the first is the default (docs/evomoe_diagnosis.md)
EVAL_ROUTING = ("argmax", "sample", "softmax")  # the gate's eval_routing; argmax is evaluation's


@dataclass
class DTSOptions(FairseqDataclass):
    dts_threshold: float = field(
        default=1e-3, metadata={"help": "dts gate: a token goes to every expert whose Gumbel-softmax weight exceeds this (default 1e-3)"}
    )
    dts_combine_weights: str = field(
        default="softmax", metadata={"help": "dts gate: combine weights of selected experts: softmax (of the logits) or gumbel (the Gumbel-softmax weights)"}
    )
    dts_sparsity: str = field(
        default="threshold",
        metadata={"help": "dts gate: how the soft phase sparsifies: threshold (the paper's: every expert whose Gumbel-softmax "
                  "weight passes --dts-threshold) or scheduled (the mean experts per token follows k(t) from --dts-k-start "
                  "down to 1 over --dts-anneal-updates, whatever the router's logit scale)"},
    )
    dts_k_start: float = field(
        default=0, metadata={"help": "dts gate, --dts-sparsity scheduled: mean experts per token at the spawn (0 = all experts)"}
    )
    dts_renormalize: bool = field(default=False, metadata={"help": "dts gate: renormalise combine weights over the selected experts"})
    dts_max_experts: int = field(default=0, metadata={"help": "dts gate: at most this many experts per token in the soft phase; 0 = no cap"})
    dts_tau_max: float = field(default=2.0, metadata={"help": "dts gate: temperature at the start of the gate-sparsify phase (default 2.0)"})
    dts_tau_min: float = field(default=0.5, metadata={"help": "dts gate: final temperature (default 0.5)"})
    dts_tau_schedule: str = field(default="linear", metadata={"help": "dts gate: temperature decay: linear, exponential or cosine"})
    dts_anneal_updates: float = field(
        default=5000, metadata={"help": "dts gate: updates D over which tau goes from max to min, counted from the expert spawn (a fraction < 1 means of --max-update)"}
    )
    dts_hard_update: Optional[float] = field(
        default=None, metadata={"help": "dts gate: update H from which routing is top-1 (a fraction < 1 means of --max-update); default: when annealing ends"}
    )
    dts_allow_hard_start: bool = field(default=False, metadata={"help": "dts gate: allow a --dts-hard-update at or before the spawn (top-1 from the start)"})
    dts_hard_routing: str = field(
        default=HARD_ROUTING[0],
        metadata={"help": "dts gate, hard phase: argmax (top-1 by argmax(l), the expert evaluation routes to; no noise; "
                  "the default) or sample (top-1 by argmax(l + g), the Gumbel-max sample, as the authors)"},
    )
    dts_hard_combine_weights: str = field(
        default="softmax",
        metadata={"help": "dts gate, hard phase: the chosen expert's combine weight: softmax (p_e of the logits) or "
                  "gumbel (its Gumbel-softmax weight y_e at the current temperature, as the authors' code with Gumbel "
                  "combine weights)"},
    )


@register_gate("dts", options=DTSOptions)
class DenseToSparseGate(RouterGate):
    state_keys = (frozenset({"router.wg.weight", "schedule_updates", "schedule_position"}),
                  frozenset({"router.wg.weight", "schedule_updates"}))  # written before schedule_position

    def __init__(self, model_dim, num_experts, args, dictionary=None):
        super().__init__(model_dim, num_experts, args, dictionary)
        self.threshold = args.dts_threshold
        self.combine = args.dts_combine_weights
        self.renormalize = args.dts_renormalize
        self.max_experts = args.dts_max_experts
        self.sparsity = getattr(args, "dts_sparsity", "threshold")
        self.k_start = getattr(args, "dts_k_start", 0) or num_experts
        if self.sparsity not in SPARSITY_MODES:
            raise ValueError(f"--dts-sparsity {self.sparsity!r} is not valid; choose one of: {', '.join(SPARSITY_MODES)}")
        if not 1 <= self.k_start <= num_experts:
            raise ValueError(f"--dts-k-start must be between 1 and --moe-expert-count ({num_experts}), or 0 for all experts; got {self.k_start}")
        self.hard_routing = getattr(args, "dts_hard_routing", HARD_ROUTING[0])
        self.hard_combine = getattr(args, "dts_hard_combine_weights", "softmax")
        self.eval_routing = "argmax"  # diagnosis only (scripts/evaluate_routing.py); not an option
        if self.hard_routing not in HARD_ROUTING:
            raise ValueError(f"--dts-hard-routing {self.hard_routing!r} is not valid; choose one of: {', '.join(HARD_ROUTING)}")
        if self.hard_combine not in COMBINE_WEIGHTS:
            raise ValueError(
                f"--dts-hard-combine-weights {self.hard_combine!r} is not valid; choose one of: {', '.join(COMBINE_WEIGHTS)}"
            )
        if self.combine not in COMBINE_WEIGHTS:
            raise ValueError(f"--dts-combine-weights {self.combine!r} is not valid; choose one of: {', '.join(COMBINE_WEIGHTS)}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"--dts-threshold must be in [0, 1), got {self.threshold}")
        if self.max_experts < 0:
            raise ValueError(f"--dts-max-experts must be >= 0 (0 = no cap), got {self.max_experts}")
        self.schedule = EvoMoESchedule.from_args(args)
        # in checkpoints, so that a resumed run keeps its schedule whatever its --max-update
        self.register_buffer("schedule_updates", torch.tensor(self._counts(self.schedule)))
        self.rerun_schedule = getattr(args, "moe_rerun_schedules", False)
        self.register_buffer("schedule_position", torch.tensor(0))
        self.loaded_position = 0  # the schedule_position of the checkpoint last loaded
        self.set_num_updates(0)

    @staticmethod
    def _counts(schedule: EvoMoESchedule):
        hard = -1 if schedule.hard_update is None else schedule.hard_update
        return [schedule.diversify_updates, schedule.anneal_updates, hard]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        t_div, anneal, hard = saved_update_counts(state_dict, prefix + "schedule_updates", self.schedule_updates, "(T_div, D, H)")
        self.schedule = replace(self.schedule, diversify_updates=t_div, anneal_updates=anneal, hard_update=None if hard < 0 else hard)
        position = state_dict.setdefault(prefix + "schedule_position", self.schedule_position.detach().clone())
        self.loaded_position = int(position)
        self.set_num_updates(self.num_updates)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        position = num_updates if self.rerun_schedule else max(num_updates, self.loaded_position)
        self.schedule_position.fill_(position)
        self.tau = self.schedule.tau(position)
        self.phase = self.schedule.phase(position)
        self.target_experts = self.schedule.experts_per_token(position, self.k_start)

    def reset_schedule(self) -> None:
        self.loaded_position = 0
        self.set_num_updates(0)

    def routes_dense_to_sparse(self) -> bool:
        return self.phase == Phase.SOFT

    def state_for_logging(self):
        state = {"temperature": self.tau, "phase": int(self.phase)}
        if self.sparsity == "scheduled":
            state["target_experts_per_token"] = self.target_experts if self.phase == Phase.SOFT else 1.0
        return state

    def forward(self, x: Tensor, token_ids=None, valid=None) -> Routing:
        logits = self.router(x)
        probs = logits.softmax(dim=-1)
        if self.training:
            return self.training_routing(x, logits, probs, droppable=True, valid=valid)
        if self.eval_routing == "sample":
            return self.training_routing(x, logits, probs, droppable=False, valid=valid)
        if self.eval_routing == "softmax":
            return every_expert_routing(logits, probs, valid)
        weight, expert = probs.max(dim=-1)
        return self._routing(x, expert, weight, probs, logits, droppable=False, valid=valid)

    def training_routing(self, x: Tensor, logits: Tensor, probs: Tensor, droppable: bool, valid=None) -> Routing:
        """The routing of the current phase's training rule (droppable: whether capacity applies
        in the hard phase; valid: the real tokens where padding stays in place, None: all)."""
        gumbel = gumbel_noise_like(logits)
        if self.phase == Phase.HARD:
            return self.hard_routing_rule(x, logits, probs, gumbel, droppable, valid)

        y = ((logits + gumbel) / self.tau).softmax(dim=-1)
        selected = self.soft_selection(y.detach(), valid)
        if valid is not None:  # padding rows select nothing
            selected &= valid[:, None]
        combine = (probs if self.combine == "softmax" else y) * selected
        if self.renormalize:
            combine = combine / combine.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(combine.dtype).eps)
        token, expert, most = selected_assignments(selected)
        weight = combine[token, expert]
        balance = self.balance_loss(combine, selected, valid)
        return Routing(token, expert, weight, weight.detach(), None, probs, balance, router_z_loss(logits, valid),
                       droppable=False, logits=logits.detach(), max_per_expert=most)

    def hard_routing_rule(self, x: Tensor, logits: Tensor, probs: Tensor, gumbel: Tensor, droppable: bool,
                          valid=None) -> Routing:
        """Top-1: argmax(l + g) or argmax(l), weighted by p_e or by the Gumbel-softmax y_e."""
        noisy = logits.detach() + gumbel
        expert = (noisy if self.hard_routing == "sample" else logits.detach()).argmax(dim=-1)
        if self.hard_combine == "gumbel":
            y = ((logits + gumbel) / self.tau).softmax(dim=-1)
            weight = y.gather(1, expert[:, None]).squeeze(1)
            routing = self._routing(x, expert, weight, y, logits, droppable, valid, probs=probs)
        else:
            weight = probs.gather(1, expert[:, None]).squeeze(1)
            routing = self._routing(x, expert, weight, probs, logits, droppable, valid)
        if self.collect_stats:
            soft = self.soft_selection((noisy / self.tau).softmax(dim=-1), valid)
            changed = (soft.sum(dim=-1) > 1) | ~soft.gather(1, expert[:, None]).squeeze(1)
            routing.token_counts = {"switch_changed": (changed if valid is None else changed & valid).sum()}
            agree = expert == logits.detach().argmax(dim=-1)
            agree, count = (agree, logits.new_tensor(x.shape[0])) if valid is None else (agree & valid, valid.sum())
            routing.sampled_stats = {"hard_eval_agree_pct": (100.0 * agree.sum().float(), count.float())}
        return routing

    def soft_selection(self, y: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """[S, E] bool: the experts the soft phase gives each token, from its Gumbel-softmax weights
        (valid: the real tokens, which alone count for the scheduled budget)."""
        if self.sparsity == "scheduled":
            selected = scheduled_selection(y, self.target_experts, valid)
        else:
            selected = y > self.threshold
            selected.scatter_(1, y.argmax(dim=-1, keepdim=True), True)  # at least one expert
        if self.max_experts and self.max_experts < self.num_experts:
            top = y.topk(self.max_experts, dim=-1).indices
            selected &= torch.zeros_like(selected).scatter_(1, top, True)
        return selected

    def _routing(self, x, expert, weight, combine, logits, droppable, valid, probs=None) -> Routing:
        """Top-1 routing; the balance loss from `combine` ([S, E] weights: p, or y), probs for the
        entropy statistics (default: combine)."""
        tokens = torch.arange(x.shape[0], device=x.device)
        selected = torch.nn.functional.one_hot(expert, self.num_experts).bool()
        balance = self.balance_loss(combine * selected, selected, valid)
        return Routing(tokens, expert, weight, weight.detach(), None, combine if probs is None else probs, balance,
                       router_z_loss(logits, valid), droppable=droppable, valid=valid, logits=logits.detach())

    def balance_loss(self, combine: Tensor, selected: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """E * sum_e (mean combine weight of e) * (fraction of tokens selecting e), over the real tokens."""
        if combine.shape[0] == 0:
            return combine.new_zeros(())
        return self.num_experts * torch.sum(token_mean(combine, valid) * token_mean(selected.float(), valid))


def scheduled_selection(y: Tensor, k: float, valid: Optional[Tensor] = None) -> Tensor:
    """[S, E] bool: round(k * S) assignments for S tokens, each token's largest weight first, then
    the largest of the remaining weights of the whole batch (so tokens whose weights are spread
    get more experts than tokens with one clear favourite). With valid, S counts the real tokens
    (on the device) and padding rows get no extra expert."""
    num_tokens, num_experts = y.shape
    selected = torch.zeros_like(y, dtype=torch.bool).scatter_(1, y.argmax(dim=-1, keepdim=True), True)
    if valid is not None:
        n = valid.sum()
        extra = torch.minimum(torch.round(k * n.double()).long(), n * num_experts) - n
        others = y.masked_fill(selected | ~valid[:, None], -1.0).reshape(-1)
        rank = torch.empty_like(others, dtype=torch.long).scatter_(
            0, others.argsort(descending=True, stable=True), torch.arange(others.numel(), device=y.device))
        return selected | (rank < extra).view_as(selected)
    extra = min(int(round(k * num_tokens)), num_tokens * num_experts) - num_tokens
    if extra > 0:
        others = y.masked_fill(selected, -1.0).reshape(-1)
        selected.view(-1)[others.topk(extra).indices] = True
    return selected


def selected_assignments(selected: Tensor) -> Tuple[Tensor, Tensor, int]:
    """The (token, expert) pairs where selected [S, E] is True, in token order, and the most tokens
    any one expert got: the soft phase's one host read (the number selected per expert), which
    sizes both the pairs and the experts' batched matmul."""
    per_expert = selected.sum(0).tolist()
    if hasattr(torch, "nonzero_static") and selected.device.type in ("cpu", "cuda"):  # elsewhere nonzero reads once more
        token, expert = torch.nonzero_static(selected, size=sum(per_expert)).unbind(1)
    else:
        token, expert = selected.nonzero(as_tuple=True)
    return token, expert, max(per_expert, default=0)
