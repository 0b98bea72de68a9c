"""The MoE criteria: fairseq's task losses plus the balance loss, with routing metrics.

moe_cross_entropy                 (language modelling)   = cross_entropy + MoE loss
moe_label_smoothed_cross_entropy  (translation)          = label_smoothed_cross_entropy + MoE loss
moe_masked_lm                     (RoBERTa)              = masked_lm + MoE loss
moe_sentence_prediction           (RoBERTa on GLUE)      = sentence_prediction + MoE loss

`loss` is what is optimised (task + MoE loss); `ppl` (not for sentence prediction, which logs
accuracy) and `nll_loss` (where fairseq logs it) are always those of the task loss alone, per
predicted token. cross_entropy and masked_lm derive them
from `loss`, so their reduce_metrics are replaced here (reduce_loss_and_ppl); label-smoothed cross
entropy derives them from its `nll_loss`, which the MoE loss never touches.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion

from .moe_loss import (
    SOFT_GATE_LOSS_WT,
    MoELossMixin,
    MoELossOptions,
    reduce_loss_and_ppl,
    reduce_moe_metrics,
    reduce_task_nll_loss,
)


@dataclass
class MoECrossEntropyConfig(CrossEntropyCriterionConfig, MoELossOptions):
    pass


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(MoELossMixin, CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load,
                 moe_soft_gate_loss_wt=SOFT_GATE_LOSS_WT, log_interval=0):
        super().__init__(task, sentence_avg)
        self.init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load,
                           moe_soft_gate_loss_wt, log_interval)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        # CrossEntropyCriterion.reduce_metrics, with nll_loss and ppl from the task loss
        reduce_moe_metrics(logging_outputs)
        reduce_loss_and_ppl(logging_outputs, "ntokens")


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
        moe_soft_gate_loss_wt=SOFT_GATE_LOSS_WT,
        log_interval=0,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load,
                           moe_soft_gate_loss_wt, log_interval)

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
        self.init_moe_loss_from_cfg(cfg)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        # MaskedLmLoss.reduce_metrics, with ppl from the task loss per masked token (= sample_size)
        reduce_moe_metrics(logging_outputs)
        reduce_loss_and_ppl(logging_outputs, "sample_size")


@dataclass
class MoESentencePredictionConfig(SentencePredictionConfig, MoELossOptions):
    pass


@register_criterion("moe_sentence_prediction", dataclass=MoESentencePredictionConfig)
class MoESentencePredictionCriterion(MoELossMixin, SentencePredictionCriterion):
    """Fine-tuning on GLUE-style tasks (classification, or regression with --regression-target):
    sentence_prediction's loss per sentence, plus the balance loss of the encoder's MoE layers."""

    def __init__(self, cfg: MoESentencePredictionConfig, task):
        super().__init__(cfg, task)
        self.init_moe_loss_from_cfg(cfg)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        # loss (task + MoE loss while training, per sentence) and accuracy as sentence_prediction
        # logs them; its nll_loss (per token) of the task loss alone, as the other MoE criteria log it
        reduce_moe_metrics(logging_outputs)
        SentencePredictionCriterion.reduce_metrics([dict(log, ntokens=log.get("sample_size", 0)) for log in logging_outputs])
        reduce_task_nll_loss(logging_outputs)
