"""The gate interface shared by every routing policy.

A gate looks at the non-padding tokens of one MoE layer and decides, for each token, which experts
process it and with what weight. The answer is a flat list of (token, expert) *assignments*, so a
gate may give each token any number of experts: one (Switch), two (GShard), a dynamic number (the
Dense-To-Sparse gate) or all of them (dense MoE).

Gates never move tokens; `moe.dispatch` applies capacity and groups the assignments by expert.

Padding: on the CPU the layer removes it before the gate. Elsewhere it stays in place (static
shapes, so that the host never waits for the device) and the gate gets `valid`, a bool [S] mask of
the real tokens: padding rows are routed like any other but marked invalid in `Routing.valid`, and
every mean over tokens (balance loss, z-loss...) is taken over the valid rows (`token_mean`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Routing:
    """The routing decision for S tokens and E experts, as P (token, expert) assignments.

    token_idx, expert_idx: LongTensor [P]; which token goes to which expert.
    weight: float tensor [P]; the combine weight of each assignment (differentiable).
    priority: float tensor [P]; higher is kept first when an expert overflows its capacity
        (batch-prioritized routing). Detached.
    rank: LongTensor [P] or None; the choice order (0 = first choice, 1 = second, ...). Every
        first choice is served before any second choice, as in GShard. None means all 0.
    probs: float tensor [S, E] or None; the router's probabilities, for entropy statistics.
    balance_loss, z_loss: scalar tensors (0 when the gate has none).
    extra_loss: a scalar the gate wants minimised besides the balance loss (e.g. StableMoE's
        routing distillation); the criterion adds it with weight 1 (x sample size).
    droppable: False when capacity must not drop anything (e.g. dense-to-sparse soft routing, evaluation).
    token_counts: numbers of tokens (scalar tensors) the gate wants logged, by name, as a percentage
        of the layer's tokens (the criterion logs moe_<name>_pct).
    logits: float tensor [S, E] or None; the router's logits (detached), for router statistics
        (where None, they are taken as log(probs), which has the same spread and top gap).
    sampled_stats: statistics the gate computes only on steps that collect statistics, by name:
        (sum, count) scalar tensors; the criterion logs moe_<name> = the summed sums over the
        summed counts (e.g. the DTS gate's hard_eval_agree_pct).
    valid: bool tensor [P] or None (all valid); False for an assignment that must not run: one of
        a padding token, or one the gate withdrew (top-2's `random` second choices). Invalid
        assignments are never kept, counted as routed, or counted as dropped.
    max_per_expert: the most assignments any expert got, where the gate read its routing on the
        host anyway (the DTS gate's soft phase); a dropless layer's batched experts then need no
        read of their own. None: not known on the host.
    """

    token_idx: Tensor
    expert_idx: Tensor
    weight: Tensor
    priority: Tensor
    rank: Optional[Tensor]
    probs: Optional[Tensor]
    balance_loss: Tensor
    z_loss: Tensor
    droppable: bool = True
    extra_loss: Optional[Tensor] = None
    # assignments per token that the capacity formula budgets for (1 for top-1, 2 for top-2)
    capacity_k: int = 1
    token_counts: Optional[Dict[str, Tensor]] = None
    logits: Optional[Tensor] = None
    sampled_stats: Optional[Dict[str, Tuple[Tensor, Tensor]]] = None
    valid: Optional[Tensor] = None
    max_per_expert: Optional[int] = None

    def __getitem__(self, index: int) -> Tensor:
        """routing[0]: the combine weights. torch's module backward hooks (fairseq's NanDetector, run
        after a NaN gradient) find a module's output tensor as output[0]; a gate's output answers
        with its differentiable one."""
        if index != 0:
            raise IndexError("a Routing has only routing[0] (its combine weights); use its fields")
        return self.weight


class Gate(nn.Module):
    """Base class: `forward(x, token_ids) -> Routing` for x of shape [S, model_dim].

    token_ids ([S] LongTensor or None) are the ids of the same S tokens; valid ([S] bool or None)
    marks the real ones among them (None: all are; see the module docstring).
    `dictionary` is the fairseq Dictionary of the stack the layer sits in (or None).
    A gate with a schedule implements `set_num_updates(num_updates)`: fairseq calls it on every
    module before each training step and after loading a checkpoint.
    """

    # set by register_gate
    name: str = ""
    # whether this forward should also compute the statistics that are only wanted on steps that
    # log (set through MoELayer.collect_stats; never at generation)
    collect_stats: bool = False
    # The keys of the gate's state in a checkpoint (its state_dict, found under `...moe.gate.`): the
    # set it writes first, then older sets it still loads. models/checkpoint_checks.py tells which
    # gate a checkpoint was trained with by them; register_gate refuses a gate that declares none.
    state_keys: Tuple[FrozenSet[str], ...] = ()
    # The gate's options that set the shape of its state: {state key: (option, dimension)}, so a
    # checkpoint made with another value is refused naming the option (the router's shape follows
    # the expert count and model size, which the check names already).
    state_shape_options: Dict[str, Tuple[str, int]] = {}

    def __init__(self, model_dim: int, num_experts: int, args, dictionary=None):
        super().__init__()
        self.model_dim = model_dim
        self.num_experts = num_experts
        self.args = args

    def forward(self, x: Tensor, token_ids: Optional[Tensor], valid: Optional[Tensor] = None) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def state_for_logging(self) -> Dict[str, float]:
        """Scalars about the gate's schedule (temperature, stage...) for the criterion's log."""
        return {}

    def training_refusal(self) -> Optional[str]:
        """Why the gate cannot train here (checked before training, not when a checkpoint is loaded
        for evaluation, which may run elsewhere), or None."""
        return None

    def routes_dense_to_sparse(self) -> bool:
        """Whether the gate is in a dense-to-sparse (soft) routing phase now, where the criterion
        weights its balance loss by --moe-soft-gate-loss-wt: only the DTS gate has one."""
        return False

    def reset_schedule(self) -> None:
        """Back to the schedule's start, as built (for weights that come from a dense model)."""


class LinearRouter(nn.Module):
    """`logits = W_g x` in fp32, with optional input jitter and a non-finite guard."""

    def __init__(self, model_dim: int, num_experts: int, jitter: float = 0.0):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.jitter = jitter
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None):
        # nn.Linear's default bound, but drawable from a seeded generator (a gate re-drawn reproducibly)
        bound = 1.0 / self.wg.in_features ** 0.5
        w = self.wg.weight
        with torch.no_grad():  # drawn on the CPU (generators are per device), then moved
            w.copy_(torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        return finite_logits(fp32_linear(x, self.wg.weight))


def fp32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T in fp32, also under autocast (--amp), which would run F.linear in fp16/bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def finite_logits(logits: Tensor) -> Tensor:
    """Replace NaN by 0 and +-inf by large finite values so one bad token cannot poison routing.
    (Applied unconditionally: testing for them first would make the host wait for the GPU.)"""
    return torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)


def count_per_expert(expert_idx: Tensor, num_experts: int, valid: Optional[Tensor] = None) -> Tensor:
    """LongTensor [E]: how many of the (valid) assignments go to each expert. Unlike torch.bincount,
    which on a GPU reads the largest index back to the host to size its output, this never waits
    for the GPU."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_idx.device)
    ones = torch.ones_like(expert_idx) if valid is None else valid.long()
    return counts.index_add_(0, expert_idx, ones)


def token_mean(t: Tensor, valid: Optional[Tensor]) -> Tensor:
    """t.mean(0) over the real tokens (rows) of t: all rows when valid is None, else the rows
    where valid is True (0 when there are none), without reading their number on the host."""
    if valid is None:
        return t.mean(dim=0)
    mask = valid.reshape(-1, *([1] * (t.dim() - 1)))
    return torch.where(mask, t, 0).sum(dim=0) / valid.sum().clamp(min=1)


def switch_balance_loss(probs: Tensor, expert_idx: Tensor, num_experts: int, valid: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    probs: [S, E] router probabilities; expert_idx: [S] the expert each token chose.
    f_e: fraction of tokens sent to e; P_e: mean router probability of e. A uniform router
    gives exactly 1. valid: [S] bool, the real tokens (None: all).
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = count_per_expert(expert_idx, num_experts, valid).to(probs.dtype)
    frac = counts / (probs.shape[0] if valid is None else valid.sum().clamp(min=1))
    return num_experts * torch.sum(frac * token_mean(probs, valid))


def router_z_loss(logits: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss: mean over (valid) tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return token_mean(torch.logsumexp(logits, dim=-1).pow(2), valid)


@dataclass
class GateSpec:
    cls: Type[Gate]
    options: Optional[type]  # a dataclass of the gate's command-line options, or None


GATE_REGISTRY: Dict[str, GateSpec] = {}


def register_gate(name: str, options: Optional[type] = None) -> Callable[[Type[Gate]], Type[Gate]]:
    """Class decorator: make a gate selectable with `--moe-gate NAME`.

    `options` is a dataclass whose fields (with `help=` metadata) become command-line options of
    every MoE architecture. The class declares its checkpoint state in `state_keys`.
    """

    def wrapper(cls: Type[Gate]) -> Type[Gate]:
        if name in GATE_REGISTRY:
            raise ValueError(f"gate {name!r} is registered twice")
        if not cls.state_keys:
            raise ValueError(f"gate {name!r} ({cls.__name__}) declares no state_keys: set it to the keys of its "
                             "state_dict (frozenset() for a gate without state), so checkpoints can name it")
        cls.name = name
        GATE_REGISTRY[name] = GateSpec(cls, options)
        return cls

    return wrapper


def build_gate(name: str, model_dim: int, num_experts: int, args, dictionary=None) -> Gate:
    if name not in GATE_REGISTRY:
        raise ValueError(
            f"--moe-gate {name!r} is not a known gate; choose one of: {', '.join(sorted(GATE_REGISTRY))}"
        )
    return GATE_REGISTRY[name].cls(model_dim, num_experts, args, dictionary=dictionary)
