"""`transformer_lm_moe`: fairseq's decoder-only (GPT-style) language model with MoE FFNs."""

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig, base_lm_architecture

from ..moe import options as moe_options
from ..moe.parallel.checkpoint import ExpertParallelModelMixin
from .checkpoint_checks import MoECheckpointChecksMixin
from .model_checks import moe_architecture, prepare_moe_args
from .moe_stack import MoETransformerDecoder


@register_model("transformer_lm_moe")
class TransformerLanguageModelMoE(MoECheckpointChecksMixin, ExpertParallelModelMixin, TransformerLanguageModel):
    @classmethod
    def add_args(cls, parser):
        gen_parser_from_dataclass(parser, TransformerLanguageModelConfig(), delete_default=True)
        moe_options.add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        args = prepare_moe_args(args, task, base_lm_moe_architecture, ("decoder",))
        # fairseq's builder picks the embeddings (plain, adaptive or character) and builds a dense
        # decoder; we keep its embeddings and build the MoE decoder around them.
        model = super().build_model(args, task)
        embed_tokens = model.decoder.embed_tokens
        model.decoder = MoETransformerDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        return model


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe")
def base_lm_moe_architecture(args):
    moe_architecture(args)
    base_lm_architecture(args)


def _gpt(args, layers, dim, heads):
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 4 * dim)
    args.decoder_layers = getattr(args, "decoder_layers", layers)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", heads)
    args.dropout = getattr(args, "dropout", 0.1)
    args.attention_dropout = getattr(args, "attention_dropout", 0.1)
    args.activation_fn = getattr(args, "activation_fn", "gelu")
    base_lm_moe_architecture(args)


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe_tiny")
def transformer_lm_moe_tiny(args):
    _gpt(args, layers=2, dim=64, heads=2)


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe_gpt_small")
def transformer_lm_moe_gpt_small(args):
    """GPT small: 12 layers, 768 dims, 12 heads, FFN 3072."""
    _gpt(args, layers=12, dim=768, heads=12)


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe_gpt_medium")
def transformer_lm_moe_gpt_medium(args):
    """GPT medium: 24 layers, 1024 dims, 16 heads, FFN 4096."""
    _gpt(args, layers=24, dim=1024, heads=16)


@register_model_architecture("transformer_lm_moe", "transformer_lm_moe_gpt_xl")
def transformer_lm_moe_gpt_xl(args):
    """GPT XL (the paper's largest): 48 layers, 1600 dims, 25 heads, FFN 6400."""
    _gpt(args, layers=48, dim=1600, heads=25)
