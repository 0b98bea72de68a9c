"""Which checkpoint a fine-tuning run restores, and whether its EvoMoE experts are spawned already:
a run whose --max-update is at or below --evomoe-diversify-updates is allowed only then."""

import argparse

import torch

from fairseq_evomoe.models.model_checks import experts_spawned_in, restored_checkpoint


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
