"""A resumed run keeps the update counts of its EvoMoE schedule as the checkpoint saved them."""

import logging
from typing import List

import torch

logger = logging.getLogger(__name__)


def saved_update_counts(state_dict: dict, key: str, current: torch.Tensor, names: str) -> List[int]:
    """The update counts (T_div, D, H...) a checkpoint's module was trained with, which a resumed
    run keeps: counts given as fractions of --max-update would otherwise move when a run is
    resumed with another --max-update (the schedule would jump back to soft routing, or before
    the spawn). `current` is the module's buffer with this run's counts; a checkpoint saved before
    the counts were stored gets them (written into `state_dict`, so that loading finds the key)."""
    mine = [int(v) for v in current.reshape(-1).tolist()]
    saved = state_dict.get(key)
    if saved is None:
        state_dict[key] = current.detach().clone()
        return mine
    saved = [int(v) for v in saved.reshape(-1).tolist()]
    if saved != mine:
        logger.warning(
            f"{key}: keeping the checkpoint's {names} = {saved}; this run's options give {mine} "
            "(update counts given as fractions follow --max-update)"
        )
    return saved
