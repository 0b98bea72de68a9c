"""`transformer_moe`: fairseq's translation transformer with MoE FFNs, and its named sizes."""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
)

from ..moe import options as moe_options
from ..moe.parallel.checkpoint import ExpertParallelModelMixin
from .checkpoint_checks import MoECheckpointChecksMixin
from .moe_stack import MoETransformerDecoder, MoETransformerEncoder
from .model_checks import moe_architecture, prepare_moe_args


@register_model("transformer_moe")
class TransformerMoEModel(MoECheckpointChecksMixin, ExpertParallelModelMixin, TransformerModel):
    """Encoder-decoder transformer whose every `--moe-freq`-th FFN is a mixture of experts."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        moe_options.add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        args = prepare_moe_args(args, task, base_moe_architecture, ("encoder", "decoder"))
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return MoETransformerEncoder(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return MoETransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


@register_model_architecture("transformer_moe", "transformer_moe")
def base_moe_architecture(args):
    moe_architecture(args)
    base_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_tiny")
def transformer_moe_tiny(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    base_moe_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_iwslt_de_en")
def transformer_moe_iwslt_de_en(args):
    transformer_iwslt_de_en(args)
    base_moe_architecture(args)


@register_model_architecture("transformer_moe", "transformer_moe_wmt_en_de_big")
def transformer_moe_wmt_en_de_big(args):
    """The paper's translation model: Transformer-big (6+6, 1024/4096, 16 heads), dropout 0.3."""
    transformer_vaswani_wmt_en_de_big(args)
    base_moe_architecture(args)
