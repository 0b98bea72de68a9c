"""`roberta_moe`: fairseq's RoBERTa (masked LM) with MoE FFNs."""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import (
    RobertaEncoder,
    RobertaModel,
    base_architecture as roberta_base_architecture,
    roberta_large_architecture,
)
from fairseq.modules.transformer_sentence_encoder import init_bert_params

from ..moe import options as moe_options
from ..moe.parallel.checkpoint import ExpertParallelModelMixin
from .checkpoint_checks import MoECheckpointChecksMixin
from .model_checks import moe_architecture, prepare_moe_args
from .moe_stack import MoETransformerEncoder


class RobertaMoEEncoder(RobertaEncoder):
    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = MoETransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        for moe in encoder.moe_layers:  # BERT init for the experts too (they are not nn.Linear)
            moe.reset_experts(std=0.02)
        return encoder


@register_model("roberta_moe")
class RobertaMoEModel(MoECheckpointChecksMixin, ExpertParallelModelMixin, RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        moe_options.add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        # RobertaModel.build_model, with the MoE encoder (and args as a Namespace, see plain_args)
        args = prepare_moe_args(args, task, base_roberta_moe_architecture, ("encoder",))
        if not hasattr(args, "max_positions"):
            if not hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        encoder = RobertaMoEEncoder(args, task.source_dictionary)
        return cls(args, encoder)


@register_model_architecture("roberta_moe", "roberta_moe")
def base_roberta_moe_architecture(args):
    moe_architecture(args)
    roberta_base_architecture(args)


@register_model_architecture("roberta_moe", "roberta_moe_base")
def roberta_moe_base(args):
    base_roberta_moe_architecture(args)


@register_model_architecture("roberta_moe", "roberta_moe_large")
def roberta_moe_large(args):
    moe_architecture(args)
    roberta_large_architecture(args)


@register_model_architecture("roberta_moe", "roberta_moe_tiny")
def roberta_moe_tiny(args):
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    base_roberta_moe_architecture(args)
