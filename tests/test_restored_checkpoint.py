"""Which checkpoint a fine-tuning run restores, and whether its EvoMoE experts are spawned already:
a run whose --max-update is at or below --evomoe-diversify-updates is allowed only then."""

import argparse
from types import SimpleNamespace

import pytest
import torch

from fairseq_evomoe.models.model_checks import check_model_against_task, experts_spawned_in, restored_checkpoint
from moe_helpers import moe_args


def _ckpt(path, *flags):
    torch.save({"model": {f"decoder.layers.{i}.moe.spawned": torch.tensor(f) for i, f in enumerate(flags)}}, path)
    return str(path)


def test_the_checkpoint_fairseq_would_restore(tmp_path):
    ns = lambda **kw: argparse.Namespace(**{"restore_file": "checkpoint_last.pt", "save_dir": str(tmp_path / "save"),  # noqa: E731
                                            "finetune_from_model": None, **kw})
    assert restored_checkpoint(ns()) is None  # a first run from scratch
    pre = _ckpt(tmp_path / "pre.pt", True)
    assert restored_checkpoint(ns(restore_file=pre)) == pre
    assert restored_checkpoint(ns(restore_file=str(tmp_path / "missing.pt"))) is None
    assert restored_checkpoint(ns(finetune_from_model=pre)) == pre
    (tmp_path / "save").mkdir()
    last = _ckpt(tmp_path / "save" / "checkpoint_last.pt", True)
    assert restored_checkpoint(ns(finetune_from_model=pre)) == last  # a relaunch resumes its own run
    assert restored_checkpoint(argparse.Namespace()) is None  # not fairseq-train (e.g. the hub)


def test_spawned_only_when_every_layer_is(tmp_path):
    assert experts_spawned_in(_ckpt(tmp_path / "a.pt", True, True))
    assert not experts_spawned_in(_ckpt(tmp_path / "b.pt", True, False))
    assert not experts_spawned_in(_ckpt(tmp_path / "c.pt"))  # no EvoMoE layer
    (tmp_path / "d.pt").write_text("not a checkpoint")
    assert not experts_spawned_in(str(tmp_path / "d.pt"))


def test_a_fine_tuned_checkpoint_loads_without_the_one_it_was_tuned_from(tmp_path):
    """The options stored in a checkpoint fine-tuned (a GLUE task) for fewer updates than
    --evomoe-diversify-updates from a spawned checkpoint build the model where that checkpoint is
    gone (generation, the hub, another machine): the fine-tuning run recorded that it restored
    spawned experts. Without the record, nothing says the experts were ever spawned."""
    stored = dict(evomoe_diversify_updates=4, max_update=3, restore_file=str(tmp_path / "moved_away.pt"),
                  save_dir=str(tmp_path))
    sentence_prediction = SimpleNamespace(drives_evomoe_phases=False)
    args = moe_args(**stored, evomoe_restores_spawned_experts=True)
    check_model_against_task(args, sentence_prediction)
    assert args.evomoe_restores_spawned_experts
    with pytest.raises(ValueError, match=r"--evomoe-diversify-updates \(4\) must be below --max-update \(3\)"):
        check_model_against_task(moe_args(**stored), sentence_prediction)
