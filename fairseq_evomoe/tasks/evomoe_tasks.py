"""Phase-switching tasks: fairseq's translation, language_modeling and masked_lm tasks with
EvoMoE's phase controller (expert spawn at T_div, temperature and phase pushed before every train
and valid step, a log line at each phase change). The tasks override `train_step`, `valid_step`
and `optimizer_step` (which, before the spawn, steps the base expert alone:
evomoe/base_expert_step.py), which fairseq's trainer calls anyway."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..evomoe.base_expert_step import base_expert_only
from ..evomoe.controller import PhaseController, diversifying_layers


class EvoMoETaskMixin:
    # read by the MoE architectures: an expert-diversify phase needs a task that spawns experts
    drives_evomoe_phases = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase_controller = PhaseController()

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.phase_controller.before_train_step(model, optimizer, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.phase_controller.before_valid_step(model)
        return super().valid_step(sample, model, criterion)

    def optimizer_step(self, optimizer, model, update_num):
        with base_expert_only(optimizer, diversifying_layers(model)):
            super().optimizer_step(optimizer, model, update_num)


@dataclass
class EvoMoETranslationConfig(TranslationConfig):
    pass


@register_task("evomoe_translation", dataclass=EvoMoETranslationConfig)
class EvoMoETranslationTask(EvoMoETaskMixin, TranslationTask):
    pass


@dataclass
class EvoMoELanguageModelingConfig(LanguageModelingConfig):
    pass


@register_task("evomoe_language_modeling", dataclass=EvoMoELanguageModelingConfig)
class EvoMoELanguageModelingTask(EvoMoETaskMixin, LanguageModelingTask):
    pass


@dataclass
class EvoMoEMaskedLMConfig(MaskedLMConfig):
    pass


@register_task("evomoe_masked_lm", dataclass=EvoMoEMaskedLMConfig)
class EvoMoEMaskedLMTask(EvoMoETaskMixin, MaskedLMTask):
    pass
