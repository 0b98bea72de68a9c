"""A clear error when a checkpoint's mixture-of-experts layout differs from the model's.

Resuming (`--restore-file`, checkpoint_last.pt), `--finetune-from-model`, and loading with
`--model-overrides` or `from_pretrained` all end in `model.load_state_dict(...)`. When the run's MoE
options differ from the checkpoint's, torch would fail with key lists and shape mismatches, which
fairseq-train turns into "please ensure that the architectures match". Before anything is copied,
the model compares the checkpoint's MoE layout, read from the state dict itself, with its own and
raises a ValueError that names each differing option with the checkpoint's value and this run's:

- which layers are MoE (`<stack>.layers.<i>.moe.*` keys): --moe-freq (and --<stack>-layers);
- the experts per MoE layer (dim 0 of `...moe.experts.fc1_weight`, always all E experts, also
  under expert parallelism, so it is compared with the model's global E): --moe-expert-count;
- the experts' hidden size (dim 1 of the same tensor): --moe-expert-ffn-dim;
- the gate, told apart by the state it keeps (`...moe.gate.*`, as each gate declares it in its
  `state_keys`): --moe-gate;
- the expert-diversify phase (EvoMoE's `...moe.spawned` flag): --evomoe-diversify-updates.

Only what torch would reject is reported: a checkpoint that loads today keeps loading. So two gates
with the same state (top1, top2, base, dense_moe: one router) are interchangeable, a checkpoint
without a buffer the model's own load hook fills (the DTS gate's `schedule_updates`) passes, and a
non-strict load (`strict=False`) is checked only for tensor shapes. The check runs in the model's
`_load_from_state_dict`, which torch calls first, after fairseq upgraded and pruned the state dict
and before any child module (and the expert-parallel hook that slices the experts) sees it.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..evomoe.expert_diversify import DiversifyingMoELayer
from ..moe.gates.base import GATE_REGISTRY
from ..moe.layer import MoELayer
from ..moe.options import moe_layer_indices
from .moe_stack import MoETransformerDecoder, MoETransformerEncoder

def gate_states() -> Dict[FrozenSet[str], Tuple[str, ...]]:
    """How each registered gate's state looks in a checkpoint (the keys under `...moe.gate.`, every
    set the gate declares in `state_keys`) -> the gates that keep it, in registration order. Several
    gates keep exactly the same state and cannot be told apart there; they also load into one another."""
    states: Dict[FrozenSet[str], Tuple[str, ...]] = {}
    for name, spec in GATE_REGISTRY.items():
        for keys in spec.cls.state_keys:
            states[keys] = states.get(keys, ()) + (name,)
    return states


class CheckpointMismatchError(ValueError):
    """The checkpoint's MoE layout differs from the model's (the message says how)."""


@dataclass
class MoEFFNState:
    """What one MoE FFN looks like, in a checkpoint or in the model."""

    experts: Optional[int] = None  # E (all experts, whatever the world size)
    ffn_dim: Optional[int] = None
    gate_keys: FrozenSet[str] = frozenset()
    gate_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    gate_buffers: FrozenSet[str] = frozenset()  # model side: state the gate may fill itself on load
    gate_name: Optional[str] = None  # model side
    diversify: bool = False
    diversify_updates: Optional[int] = None  # model side: T_div


@dataclass
class StackLayout:
    label: str  # "encoder" / "decoder"
    num_layers: int
    moe: Dict[int, MoEFFNState] = field(default_factory=dict)
    dense_ffn_dim: Optional[int] = None  # the hidden size of its dense FFNs (None: it has none)


class MoECheckpointChecksMixin:
    """Mixed into the MoE fairseq models: check a state dict's MoE layout before loading it."""

    def load_state_dict(self, state_dict, strict=True, *args, **kwargs):
        self._moe_load_strict = strict  # torch hands _load_from_state_dict strict=True regardless
        try:
            return super().load_state_dict(state_dict, strict, *args, **kwargs)
        finally:
            self._moe_load_strict = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        check_checkpoint_layout(self, state_dict, prefix, strict=self.__dict__.get("_moe_load_strict", True))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)


def check_checkpoint_layout(model: nn.Module, state_dict, prefix: str = "", strict: bool = True) -> None:
    """Raise CheckpointMismatchError when `state_dict` (keys under `prefix`) has another MoE layout
    than `model`; with strict=False only differences in tensor shapes count."""
    findings, fixes = [], []
    for name, stack in model_stacks(model):
        mine = model_layout(stack, name)
        theirs = checkpoint_layout(state_dict, f"{prefix}{name}.layers.", mine.label)
        if theirs is None:  # the checkpoint has no such stack: torch will say so
            continue
        compare(theirs, mine, strict, findings, fixes)
        if strict and getattr(stack, "layer_norm", None) is not None and f"{prefix}{name}.layer_norm.weight" not in state_dict:
            # fairseq adds a stack's final LayerNorm only to pre-norm models
            findings.append(
                f"--{mine.label}-normalize-before: the checkpoint's {mine.label} has no final LayerNorm, so it was "
                f"trained post-norm (stock --arch transformer_lm's default); this model is pre-norm (fairseq's "
                f"base_lm_architecture, which the MoE LM architectures build on, sets --{mine.label}-normalize-before), "
                "and the weights would run in another network: train the dense model with "
                f"--{mine.label}-normalize-before (or a GPT-size --arch such as transformer_lm_gpt)"
            )
    if findings:
        raise CheckpointMismatchError(mismatch_message(findings, fixes))


def model_stacks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the model's layer stacks that may hold MoE layers."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MoETransformerEncoder, MoETransformerDecoder))]


def stack_label(name: str) -> str:
    """The option prefix of a stack's name: "encoder.sentence_encoder" (RoBERTa) -> "encoder"."""
    for label in ("decoder", "encoder"):
        if label in name.split("."):
            return label
    return name


def model_layout(stack: nn.Module, name: str) -> StackLayout:
    layout = StackLayout(stack_label(name), len(stack.layers))
    for i, layer in enumerate(stack.layers):
        moe = getattr(layer, "moe", None)
        if not isinstance(moe, MoELayer):
            fc1 = getattr(getattr(layer, "fc1", None), "weight", None)
            if isinstance(fc1, torch.Tensor) and fc1.dim() == 2:
                layout.dense_ffn_dim = int(fc1.shape[0])
            continue
        diversify = isinstance(moe, DiversifyingMoELayer)
        gate_state = moe.gate.state_dict()
        layout.moe[i] = MoEFFNState(
            experts=moe.num_experts,  # global E; under expert parallelism the local tensors hold E/W
            ffn_dim=moe.experts.fc1_weight.shape[1],
            gate_keys=frozenset(gate_state),
            gate_shapes={k: tuple(v.shape) for k, v in gate_state.items()},
            gate_buffers=frozenset(n for n, _ in moe.gate.named_buffers()),
            gate_name=moe.gate.name,
            diversify=diversify,
            diversify_updates=moe.plan.updates if diversify else None,
        )
    return layout


def checkpoint_layout(state_dict, layers_prefix: str, label: str) -> Optional[StackLayout]:
    """The MoE layout of one stack in a state dict (keys `<layers_prefix><i>.…`), or None if it
    has no key there."""
    indices, moe, dense_ffn_dim = set(), {}, None
    for key, value in state_dict.items():
        if not key.startswith(layers_prefix):
            continue
        index, _, rest = key[len(layers_prefix):].partition(".")
        if not index.isdigit():
            continue
        indices.add(int(index))
        if rest == "fc1.weight" and isinstance(value, torch.Tensor) and value.dim() == 2:
            dense_ffn_dim = int(value.shape[0])
        if not rest.startswith("moe."):
            continue
        state = moe.setdefault(int(index), MoEFFNState())
        rest = rest[len("moe."):]
        if rest == "experts.fc1_weight" and isinstance(value, torch.Tensor) and value.dim() == 3:
            state.experts, state.ffn_dim = int(value.shape[0]), int(value.shape[1])
        elif rest.startswith("gate."):
            state.gate_keys = state.gate_keys | {rest[len("gate."):]}
            if isinstance(value, torch.Tensor):
                state.gate_shapes[rest[len("gate."):]] = tuple(value.shape)
        elif rest == "spawned":
            state.diversify = True
    if not indices:
        return None
    return StackLayout(label, max(indices) + 1, moe, dense_ffn_dim)


def compare(theirs: StackLayout, mine: StackLayout, strict: bool, findings: List[str], fixes: List[str]) -> None:
    stack = mine.label
    if strict and theirs.num_layers != mine.num_layers:
        findings.append(f"--{stack}-layers: the checkpoint has {theirs.num_layers} {stack} layers; "
                        f"this run asked for {mine.num_layers}")
        fixes.append(f"--{stack}-layers {theirs.num_layers}")
    if strict and sorted(theirs.moe) != sorted(mine.moe):
        ckpt_freq = moe_freq_of(sorted(theirs.moe), theirs.num_layers)
        run_freq = moe_freq_of(sorted(mine.moe), mine.num_layers)
        findings.append(
            f"--moe-freq: the checkpoint has {describe_placement(sorted(theirs.moe), stack, ckpt_freq)}; "
            f"this run asked for {describe_placement(sorted(mine.moe), stack, run_freq)}"
        )
        if ckpt_freq is not None:
            fixes.append(f"--moe-freq {ckpt_freq}")
    both = [i for i in sorted(mine.moe) if i in theirs.moe]
    pairs = [(theirs.moe[i], mine.moe[i]) for i in both]

    def differing(attr):
        return [(getattr(t, attr), getattr(m, attr)) for t, m in pairs
                if getattr(t, attr) is not None and getattr(t, attr) != getattr(m, attr)]

    experts = differing("experts")
    if experts:
        findings.append(f"--moe-expert-count: the checkpoint has {values(e for e, _ in experts)} experts in each MoE "
                        f"layer; this run asked for {values(e for _, e in experts)}")
        fixes.append(f"--moe-expert-count {values(e for e, _ in experts)}")
    dense = None not in (theirs.dense_ffn_dim, mine.dense_ffn_dim) and theirs.dense_ffn_dim != mine.dense_ffn_dim
    if dense:
        findings.append(f"--{stack}-ffn-embed-dim: the checkpoint's dense FFNs have a hidden size of "
                        f"{theirs.dense_ffn_dim}; this run asked for {mine.dense_ffn_dim}")
        fixes.append(f"--{stack}-ffn-embed-dim {theirs.dense_ffn_dim}")
    ffn = differing("ffn_dim")
    if ffn:
        findings.append(f"--moe-expert-ffn-dim (default: --{stack}-ffn-embed-dim): the checkpoint's experts have a "
                        f"hidden size of {values(f for f, _ in ffn)}; this run asked for {values(f for _, f in ffn)}")
        # where the dense FFNs' fix gives the experts their size too (--moe-expert-ffn-dim left at its default)
        if not (dense and {f for f, _ in ffn} == {theirs.dense_ffn_dim}):
            fixes.append(f"--moe-expert-ffn-dim {values(f for f, _ in ffn)}")
    for t, m in pairs[:1]:
        spec = GATE_REGISTRY.get(m.gate_name)
        for key, (option, dim) in (spec.cls.state_shape_options if spec else {}).items():
            have, want = t.gate_shapes.get(key), m.gate_shapes.get(key)
            if have is not None and want is not None and len(have) == len(want) and have[dim] != want[dim]:
                findings.append(f"{option}: the checkpoint's gates have {have[dim]}; this run asked for {want[dim]}")
                fixes.append(f"{option} {have[dim]}")
    if not strict:
        return
    states = gate_states()
    gates = [(t, m) for t, m in pairs if gate_differs(t, m)]
    if gates:
        t, m = gates[0]
        names = states.get(t.gate_keys)
        theirs_gate = (f"the {names[0]} gate" if names and len(names) == 1 else
                       f"one of the gates {', '.join(names[:-1])} or {names[-1]}, which keep the same state"
                       if names else "a gate this check does not know")
        findings.append(
            f"--moe-gate: the checkpoint's MoE layers were trained with {theirs_gate} "
            f"(gate state: {', '.join(sorted(t.gate_keys)) or 'none'}); this run asked for --moe-gate {m.gate_name} "
            f"(gate state: {', '.join(sorted(m.gate_keys)) or 'none'})"
        )
        if names:
            fixes.append(f"--moe-gate {'/'.join(names)}")
    filled = [(t, m) for t, m in pairs if not gate_differs(t, m) and t.gate_keys != m.gate_keys
              and m.gate_name not in states.get(t.gate_keys, (m.gate_name,))]
    if filled:
        t, m = filled[0]
        names = states[t.gate_keys]
        logging.getLogger(__name__).warning(
            f"the checkpoint's MoE gates keep the state of --moe-gate {'/'.join(names)} "
            f"({', '.join(sorted(t.gate_keys))}); this run loads them into --moe-gate {m.gate_name}, which starts "
            f"{', '.join(sorted(m.gate_keys - t.gate_keys))} anew. Resuming a run trained with --moe-gate "
            f"{names[0]}? Pass that gate (a {m.gate_name} checkpoint written before this state existed loads so too)"
        )
    missing_diversify = [m for t, m in pairs if m.diversify and not t.diversify]
    if missing_diversify:
        findings.append(
            f"--evomoe-diversify-updates: the checkpoint's MoE layers have no expert-diversify phase (no "
            f"`moe.spawned` flag: trained without --evomoe-diversify-updates, e.g. with a non-*_evomoe* architecture); "
            f"this run asked for one (--evomoe-diversify-updates: spawn the experts at update "
            f"{missing_diversify[0].diversify_updates})"
        )
        fixes.append("--evomoe-diversify-updates 0")


def gate_differs(theirs: MoEFFNState, mine: MoEFFNState) -> bool:
    """Whether torch would reject the checkpoint's gate state: keys the model's gate lacks, or
    parameters it needs that the checkpoint lacks. A missing buffer is no mismatch: a gate fills it
    itself (the DTS gate's `schedule_updates` in a checkpoint older than that buffer)."""
    return bool(theirs.gate_keys - mine.gate_keys) or bool((mine.gate_keys - theirs.gate_keys) - mine.gate_buffers)


def moe_freq_of(indices: List[int], num_layers: int) -> Optional[int]:
    """The --moe-freq that puts MoE FFNs in exactly `indices` of `num_layers` layers, if any."""
    for freq in range(num_layers + 1):
        if moe_layer_indices(num_layers, freq) == indices:
            return freq
    return None


def describe_placement(indices: List[int], stack: str, freq: Optional[int]) -> str:
    where = f"MoE FFNs in {stack} layers {indices}" if indices else f"no MoE FFN in the {stack}"
    return f"{where} (--moe-freq {freq})" if freq is not None else where


def values(items: Iterable) -> str:
    distinct = sorted(set(items))
    return " or ".join(str(v) for v in distinct)


def mismatch_message(findings: List[str], fixes: List[str]) -> str:
    findings, fixes = list(dict.fromkeys(findings)), list(dict.fromkeys(fixes))
    lines = ["the checkpoint's mixture-of-experts layout does not match the model this run built:"]
    lines += [f"  {f}" for f in findings]
    advice = "To load it, run with the checkpoint's values"
    if fixes:
        advice += f" ({' '.join(fixes)})"
    advice += (" or the --arch it was trained with; to train the new layout, start from scratch in another "
               "--save-dir (the --reset-* options reset the optimizer, meters and data loader, not the model's "
               "architecture)")
    lines.append(advice)
    return "\n".join(lines)
