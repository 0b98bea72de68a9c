"""Checks that need both the model options and the task, run before a model is built."""


def check_model_against_task(args, task) -> None:
    diversify = getattr(args, "evomoe_diversify_updates", 0) or 0
    if diversify > 0 and not getattr(task, "drives_evomoe_phases", False):
        raise ValueError(
            f"--evomoe-diversify-updates {diversify} needs a phase-switching task that spawns the experts "
            "(--task evomoe_translation, evomoe_language_modeling or evomoe_masked_lm); "
            "with another task set --evomoe-diversify-updates 0"
        )
