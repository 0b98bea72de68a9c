"""The MoE criteria: fairseq's task losses plus the balance loss, with routing metrics.

moe_cross_entropy                 (language modelling)   = cross_entropy + MoE loss
moe_label_smoothed_cross_entropy  (translation)          = label_smoothed_cross_entropy + MoE loss
moe_masked_lm                     (RoBERTa)              = masked_lm + MoE loss
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss

from .moe_loss import MoELossMixin, MoELossOptions, log_ppl_from_inner_loss, reduce_moe_metrics


@dataclass
class MoECrossEntropyConfig(CrossEntropyCriterionConfig, MoELossOptions):
    pass


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(MoELossMixin, CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load):
        super().__init__(task, sentence_avg)
        self.init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        reduce_moe_metrics(logging_outputs)
        log_ppl_from_inner_loss(logging_outputs)
        super().reduce_metrics(logging_outputs)


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig, MoELossOptions):
    pass


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropyCriterion(MoELossMixin, LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        moe_gate_loss_wt,
        moe_gate_loss_combine_method,
        moe_z_loss_wt,
        moe_log_expert_load,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        reduce_moe_metrics(logging_outputs)  # ppl stays derived from nll_loss (the task loss)
        super().reduce_metrics(logging_outputs)


@dataclass
class MoEMaskedLmConfig(MaskedLmConfig, MoELossOptions):
    pass


@register_criterion("moe_masked_lm", dataclass=MoEMaskedLmConfig)
class MoEMaskedLmLoss(MoELossMixin, MaskedLmLoss):
    def __init__(self, cfg: MoEMaskedLmConfig, task):
        super().__init__(cfg, task)
        self.init_moe_loss(cfg.moe_gate_loss_wt, cfg.moe_gate_loss_combine_method, cfg.moe_z_loss_wt, cfg.moe_log_expert_load)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        reduce_moe_metrics(logging_outputs)
        log_ppl_from_inner_loss(logging_outputs)
        MaskedLmLoss.reduce_metrics(logging_outputs)
