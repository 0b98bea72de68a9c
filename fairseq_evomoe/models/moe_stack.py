"""fairseq's transformer encoder and decoder with every `moe_freq`-th FFN replaced by an MoE.

How the FFN is swapped, reusing fairseq's layer code unchanged:
fairseq's layers compute their FFN sub-block inline as
`fc2(activation_dropout(activation_fn(fc1(x))))` between the residual and the layer norm. An MoE
layer here makes `fc1` the whole mixture of experts and `activation_fn`, `activation_dropout` and
`fc2` identities, so fairseq's own `forward` (attention, residuals, norms, dropout, incremental
state) runs as is and the MoE only replaces the FFN. `--scale-fc` (a LayerNorm between fc1 and
fc2) is rejected for MoE layers.

Re-expressed from fairseq (and why):
- the FSDP wrapping of a built layer (`wrap_layer`), because fairseq's `build_*_layer`
  constructs the dense layer class inside the same method. MoE layers are not activation-
  checkpointed (see `wrap_layer`); with `--checkpoint-activations` fairseq still checkpoints the
  dense layers;
- the layers are swapped after fairseq built the dense stack, since fairseq builds the stack in
  one list comprehension without telling `build_*_layer` the layer index.

Token ids reach the MoE layers through `routing_tokens`, a context manager that the encoder's
`forward` and the decoder's `extract_features` open around fairseq's code: the MoE layers read
them to skip padding and, for the Hash and StableMoE gates, to route by token. It also clears
each layer's `metadata` first, so that a layer LayerDrop skipped in this forward reports nothing
(rather than the losses of an earlier batch, whose graph is gone).
"""

import logging

from contextlib import contextmanager
from typing import List, Optional

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .. import patches
from ..evomoe.expert_diversify import DiversifyingMoELayer, DiversifyPlan
from ..evomoe.schedule import resolve_updates
from ..evomoe.spawn import SpawnSettings
from ..moe.experts import EXPERT_DTYPES, ExpertFFNs
from ..moe.gates.base import build_gate
from ..moe.layer import MoELayer, moe_layers
from ..moe.options import moe_layer_indices
from ..moe.parallel.checkpoint import install_checkpoint_hooks
from ..moe.parallel.placement import ExpertPlacement
from ..moe.parallel.sharding import shard_experts

logger = logging.getLogger(__name__)


def _identity(x):
    return x


def build_moe_layer(cfg, model_dim: int, dense_ffn_dim: int, dictionary) -> MoELayer:
    """One MoE FFN from the model's (validated) options: a DiversifyingMoELayer when EvoMoE's
    expert-diversify phase is on, else a plain MoELayer. Under expert parallelism the experts are
    sharded and the hooks that keep checkpoints complete are installed here."""
    ffn_dim = cfg.moe_expert_ffn_dim or dense_ffn_dim
    activation_dropout = getattr(cfg, "activation_dropout", 0.0) or getattr(cfg, "relu_dropout", 0.0) or 0.0
    placement = ExpertPlacement.from_environment(cfg.moe_expert_count)
    experts = ExpertFFNs(
        cfg.moe_expert_count,  # built whole (same init as one process), then sharded to the local experts
        model_dim,
        ffn_dim,
        utils.get_activation_fn(cfg.activation_fn),
        activation_dropout,
        compute_dtype=EXPERT_DTYPES[cfg.moe_expert_dtype],
    )
    experts = distribute_experts(experts, placement)
    gate = build_gate(cfg.moe_gate, model_dim, cfg.moe_expert_count, cfg, dictionary=dictionary)
    layer_options = dict(
        capacity_factor=cfg.moe_capacity_factor,
        eval_capacity_factor=cfg.moe_eval_capacity_factor,
        drop_policy=cfg.moe_drop_policy,
        padding_idx=dictionary.pad(),
        placement=placement,
    )
    diversify_updates = resolve_updates(cfg.evomoe_diversify_updates, getattr(cfg, "max_update", 0) or 0, "--evomoe-diversify-updates")
    if diversify_updates > 0:
        plan = DiversifyPlan(diversify_updates, SpawnSettings.from_args(cfg), getattr(cfg, "evomoe_plain_task", None))
        layer = DiversifyingMoELayer(gate, experts, plan, **layer_options)
    else:
        layer = MoELayer(gate, experts, **layer_options)
    layer.training_refused = getattr(cfg, "moe_training_refused", None)
    return layer


def distribute_experts(experts: ExpertFFNs, placement: ExpertPlacement) -> ExpertFFNs:
    """Under expert parallelism: keep this worker's experts, install the hooks that save all of
    them and load this worker's, and the global wraps that expert parallelism needs (patches.py).
    A no-op in one process."""
    if not placement.is_distributed:
        return experts
    experts = shard_experts(experts, placement)
    install_checkpoint_hooks(experts, placement)
    patches.install_for_expert_parallelism()
    return experts


class NoDenseFFN(nn.Identity):
    """fc1 and fc2 of an MoE layer while fairseq builds it: an identity with empty, unsaved
    `weight` and `bias` (fairseq 0.12.2's encoder layer reads their shapes in its constructor)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", torch.empty(0), persistent=False)


# fairseq 0.12.2's encoder layer keeps fused copies of its weights for an inference kernel
# (BetterTransformer) that runs a dense FFN; an MoE layer has no such copies and never takes it
FAST_PATH_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                    "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def no_fused_inference(layers) -> None:
    """fairseq 0.12.2 only: its encoder layers' fused inference kernel skips an MoE FFN, and with
    recent torch it fails in the dense layers too ("Mask Type should be defined"); switched off
    for every layer of an MoE encoder (fairseq-fixed has no such kernel)."""
    for layer in layers:
        if hasattr(layer, "can_use_fastpath"):
            layer.can_use_fastpath = False


class MoEFFNMixin:
    """Turns a fairseq transformer layer's FFN sub-block into `self.moe` (see module docstring)."""

    def build_fc1(self, *args, **kwargs):
        return NoDenseFFN()  # replaced by the MoE; avoids allocating a dense fc1

    def build_fc2(self, *args, **kwargs):
        return NoDenseFFN()

    def install_moe(self, moe: MoELayer) -> None:
        del self.fc1
        self.moe = moe
        self.activation_fn = _identity
        self.activation_dropout_module = nn.Identity()

    @property
    def fc1(self):
        return self.moe

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints written before EvoMoE's layer became a subclass stored its two buffers in
        every MoE layer; a layer without an expert-diversify phase has neither."""
        if not isinstance(self.moe, DiversifyingMoELayer):
            for buffer in ("spawned", "spawn_update"):
                state_dict.pop(f"{name}.moe.{buffer}", None)
        upgrade = getattr(super(), "upgrade_state_dict_named", None)
        if upgrade is not None:
            upgrade(state_dict, name)


def upcycle_dense_stack(layers, state_dict, name: str) -> None:
    """When the checkpoint's stack `name` is dense (no MoE layer at all: a model trained by stock
    fairseq), upcycle each of our MoE layers from it; a stack with MoE layers elsewhere is a
    mismatch, which models/checkpoint_checks.py reports."""
    prefix = f"{name}.layers."
    if any(key.startswith(prefix) and ".moe." in key for key in state_dict):
        return
    for i, layer in enumerate(layers):
        moe = getattr(layer, "moe", None)
        if isinstance(moe, MoELayer) and f"{prefix}{i}.fc1.weight" in state_dict:
            upcycle_dense_ffn(moe, state_dict, f"{prefix}{i}")


def upcycle_dense_ffn(moe: MoELayer, state_dict, name: str) -> None:
    """Upcycling: the dense FFN of layer `name` in a dense model's state dict (fc1, fc2) becomes
    every expert of its MoE layer, so each MoE layer starts as the dense model's FFN (EvoMoE's
    base expert, before the spawn); the gate and the routing schedule come from the model, back at
    the schedule's start (fairseq moves the model to the dense checkpoint's update count before it
    loads the weights, which would have spawned the experts already). Everything else in the dense
    checkpoint loads as is."""
    moe.reset_schedule()
    for dense, expert in (("fc1.weight", "fc1_weight"), ("fc1.bias", "fc1_bias"),
                          ("fc2.weight", "fc2_weight"), ("fc2.bias", "fc2_bias")):
        t = state_dict.pop(f"{name}.{dense}")  # all E experts: expert parallelism keeps its own slice on load
        state_dict[f"{name}.moe.experts.{expert}"] = t.unsqueeze(0).expand(moe.num_experts, *t.shape).clone()
    own = {**moe.gate.state_dict(prefix=f"{name}.moe.gate."),
           **{f"{name}.moe.{b}": v for b, v in moe.named_buffers(recurse=False)}}
    for key, value in own.items():
        state_dict.setdefault(key, value.detach().clone())


class MoETransformerEncoderLayer(MoEFFNMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self.install_moe(moe)
        for name in FAST_PATH_PARAMS:  # fairseq 0.12.2 only (see FAST_PATH_PARAMS)
            self._parameters.pop(name, None)

    def _load_from_state_dict(self, *args, **kwargs):
        # past fairseq 0.12.2's encoder layer, which fills the fused copies from fc1.weight etc. here
        nn.Module._load_from_state_dict(self, *args, **kwargs)


class MoETransformerDecoderLayer(MoEFFNMixin, TransformerDecoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self.install_moe(moe)


def wrap_layer(layer: nn.Module, cfg) -> nn.Module:
    """FSDP wrapping of a layer with an MoE FFN, as fairseq's build_*_layer does, but without
    activation checkpointing: fairseq's checkpoint wrapper runs the forward without autograd and
    again in the backward, and an MoE layer's balance loss and z-loss leave it beside its output
    (in `metadata`, for the criterion) while its token ids come from `routing_tokens`. Checkpointed,
    the balance loss would get no gradient and the recomputed forward would route padding."""
    min_params_to_wrap = cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


def log_uncheckpointed(stack: str, indices: List[int], cfg) -> None:
    if cfg.checkpoint_activations and indices:
        logger.info(
            f"--checkpoint-activations: {stack} layers {indices} (MoE) keep their activations; "
            "the dense layers are checkpointed"
        )


def install_moe_layers(layers: nn.ModuleList, cfg, stack_cfg, dictionary, stack: str, make_layer) -> List[MoELayer]:
    """Swap every `moe_freq`-th layer of a built fairseq stack (`stack`: "encoder" or "decoder")
    for `make_layer(moe)`, the same layer with an MoE FFN; returns the MoE layers in order."""
    indices = moe_layer_indices(len(layers), cfg.moe_freq)
    for i in indices:
        moe = build_moe_layer(cfg, stack_cfg.embed_dim, stack_cfg.ffn_embed_dim, dictionary)
        moe.layer_name = f"{stack[:3]}{i}"
        layers[i] = wrap_layer(make_layer(moe), cfg)
    log_uncheckpointed(stack, indices, cfg)
    return moe_layers(layers)


@contextmanager
def routing_tokens(layers: List[MoELayer], tokens):
    """Let the MoE layers see the token ids [batch, time] of the current forward, and clear what
    they reported for the previous one."""
    for m in layers:
        m.metadata = {}
        m.routing_tokens = tokens
    try:
        yield
    finally:
        for m in layers:
            m.routing_tokens = None


class MoETransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        cfg = TransformerConfig.from_namespace(cfg)
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        self.moe_layers = install_moe_layers(
            self.layers, cfg, cfg.encoder, dictionary, "encoder",
            lambda moe: MoETransformerEncoderLayer(cfg, moe, return_fc=return_fc),
        )
        no_fused_inference(self.layers)

    def upgrade_state_dict_named(self, state_dict, name):
        upcycle_dense_stack(self.layers, state_dict, name)
        return super().upgrade_state_dict_named(state_dict, name)

    def forward(self, src_tokens, src_lengths=None, return_all_hiddens: bool = False, token_embeddings=None):
        with routing_tokens(self.moe_layers, src_tokens):
            return super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)


class MoETransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        cfg = TransformerConfig.from_namespace(cfg)
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection)
        self.moe_layers = install_moe_layers(
            self.layers, cfg, cfg.decoder, dictionary, "decoder",
            lambda moe: MoETransformerDecoderLayer(cfg, moe, no_encoder_attn=no_encoder_attn),
        )

    def upgrade_state_dict_named(self, state_dict, name):
        upcycle_dense_stack(self.layers, state_dict, name)
        return super().upgrade_state_dict_named(state_dict, name)

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        # with an incremental state fairseq feeds only the last position through the layers
        tokens = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        with routing_tokens(self.moe_layers, tokens):
            return super().extract_features(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment=full_context_alignment,
                alignment_layer=alignment_layer,
                alignment_heads=alignment_heads,
            )
