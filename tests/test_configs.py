"""Every Hydra config in configs/ composes (every gate with each task family's tiny config, every
config with the switch, evomoe and dense gates), resolves and names things that exist:
the task, model architecture, criterion, optimizer and scheduler are registered, every model key is an
option of the (legacy, argparse-style) model, the MoE settings pass the model's own validation, and
the task/criterion/optimizer/scheduler sections merge with their fairseq dataclasses. One tiny config
really trains two updates through `fairseq-hydra-train` on the shipped WikiText-2.

A gate or task a config names that is not registered fails the test.
"""

import argparse
import os

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import REPO, USER_DIR

import fairseq_evomoe  # noqa: F401  (registers the models, gates, criteria, tasks)
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.registry import REGISTRIES
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

from fairseq_evomoe.moe import options as moe_options
from fairseq_evomoe.moe.gates.base import GATE_REGISTRY

CONFIGS = REPO / "configs"
PRIMARY = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GATES = sorted(p.stem for p in (CONFIGS / "gate").glob("*.yaml"))
EXPECTED_GATES = {"dense", "switch", "top2", "base", "hash", "stablemoe", "dense_moe", "evomoe", "evomoe_scheduled",
                  "evomoe_authors"}
EXPECTED_PRIMARY = {"wmt17_en_de", "iwslt14_de_en", "gpt_small", "gpt_medium", "roberta_base", "roberta_large",
                    "tiny_lm", "tiny_mt", "tiny_mlm"}


def compose(name: str, overrides=()):
    """Compose a config the way fairseq-hydra-train does (FairseqConfig schema under the config's name)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    hydra_init(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = hydra_compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.choices.gate}
    with open_dict(cfg):
        del cfg["hydra"]
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    add_defaults(cfg)
    return cfg


def model_option_names(model_cls) -> set:
    parser = argparse.ArgumentParser(add_help=False)
    model_cls.add_args(parser)
    return {a.dest for a in parser._actions}


def test_every_task_and_gate_has_a_config():
    assert EXPECTED_PRIMARY <= set(PRIMARY), f"missing task configs: {EXPECTED_PRIMARY - set(PRIMARY)}"
    assert EXPECTED_GATES <= set(GATES), f"missing gate configs: {EXPECTED_GATES - set(GATES)}"


# every gate with one config of each task family (the tiny ones), and every config with the gates
# that change its task or its layers (a Hydra composition costs about 0.4 s)
TINY = [n for n in PRIMARY if n.startswith("tiny_")]
COMBINATIONS = sorted({(n, g) for n in TINY for g in GATES} | {(n, g) for n in PRIMARY for g in ("switch", "evomoe", "dense")})


@pytest.mark.parametrize("name, gate", COMBINATIONS)
def test_config_resolves(name, gate):
    cfg = compose(name, [f"gate={gate}"])
    m = cfg.model
    # a gate or task that does not register is a failure, not a skip
    assert m.get("moe_gate") is None or m.moe_gate in GATE_REGISTRY, f"gate {m.moe_gate!r} is not registered"
    assert cfg.task._name in TASK_REGISTRY, f"task {cfg.task._name!r} is not registered"

    # the gate group chose the routing (and, for EvoMoE, the phase-switching task)
    if gate == "dense":
        assert m.moe_freq == 0
    elif gate.startswith("evomoe"):
        assert m.moe_gate == "dts" and cfg.task._name.startswith("evomoe_")
        # the authors' released code has no expert-diversify phase
        assert (m.evomoe_diversify_updates == 0) == (gate == "evomoe_authors")
        assert m.max_update == cfg.optimization.max_update
        assert m.get("dts_sparsity", "threshold") == {"evomoe_scheduled": "scheduled"}.get(gate, "threshold")
    else:
        assert not cfg.task._name.startswith("evomoe_")
        assert m.moe_gate == {"switch": "top1"}.get(gate, gate)
    assert cfg.checkpoint.save_dir.endswith(f"/{gate}")

    # registered components; sections with a dataclass merge without unknown keys
    assert m._name in ARCH_MODEL_REGISTRY, f"unknown architecture {m._name}"
    merge_with_parent(TASK_DATACLASS_REGISTRY[cfg.task._name](), cfg.task)
    for group in ("criterion", "optimizer", "lr_scheduler"):
        reg = REGISTRIES[group]
        assert cfg[group]._name in reg["registry"], f"unknown {group} {cfg[group]._name}"
        dc = reg["dataclass_registry"].get(cfg[group]._name)
        if dc is not None:
            merge_with_parent(dc(), cfg[group])

    # legacy (argparse) model: hydra cannot check the keys, so check them against add_args here
    model_cls = ARCH_MODEL_REGISTRY[m._name]
    known = model_option_names(model_cls)
    # max_update: copied into the model section by gate/evomoe.yaml (the EvoMoE phases are fractions of it)
    unknown = sorted(k for k in m if k not in ("_name", "max_update") and k not in known)
    assert not unknown, f"{name}.yaml gate={gate}: model keys that are not options of {m._name}: {unknown}"

    # fairseq's own build path for a legacy model: the architecture function fills defaults on the
    # DictConfig, then the MoE options are validated as the model's build_model does
    with open_dict(m):
        ARCH_CONFIG_REGISTRY[m._name](m)
    layers = {"decoder": m.decoder_layers} if "decoder_layers" in m else {}
    if "encoder_layers" in m and not m._name.startswith("transformer_lm"):
        layers["encoder"] = m.encoder_layers
    moe_options.validate(m, layers)
    assert m.moe_expert_count == 4
    if m.moe_freq:  # no config sets an option its gate ignores (that would warn at every run)
        assert moe_options.unused_gate_options(m) == []


def test_paper_translation_setting():
    cfg = compose("wmt17_en_de", ["gate=evomoe"])
    m = cfg.model
    assert m._name == "transformer_moe_wmt_en_de_big" and m.moe_expert_count == 4 and m.moe_freq == 2
    assert m.dropout == 0.3 and cfg.criterion.label_smoothing == 0.1
    assert cfg.optimizer._name == "adam" and tuple(eval(cfg.optimizer.adam_betas)) == (0.9, 0.98)
    assert cfg.lr_scheduler._name == "inverse_sqrt" and cfg.lr_scheduler.warmup_updates == 4000
    assert list(cfg.optimization.lr) == [0.0005] and cfg.dataset.max_tokens == 4096


@pytest.mark.parametrize("name, weight, combine", [
    ("wmt17_en_de", 0.0, "sum"),        # their translation scripts: --moe-gate-loss-wt 0, summed
    ("gpt_small", 0.01, "average"),     # their GPT runs: 0.01
    ("roberta_base", 0.01, "average"),  # not published: the config's weight
])
def test_authors_gate_sets_their_balance_loss(name, weight, combine):
    """gate=evomoe_authors also sets the criterion's balance loss as the authors ran it, in both DTS
    phases (-1: the soft phase at the same weight), and a command-line override still wins."""
    c = compose(name, ["gate=evomoe_authors"]).criterion
    assert (c.moe_gate_loss_wt, c.moe_gate_loss_combine_method, c.moe_soft_gate_loss_wt) == (weight, combine, -1)
    assert compose(name, ["gate=evomoe_authors", "criterion.moe_gate_loss_wt=0.05"]).criterion.moe_gate_loss_wt == 0.05
    # today's default gate keeps the project's criterion: no balance loss in the soft phase
    assert compose(name, ["gate=evomoe"]).criterion.moe_soft_gate_loss_wt == 0


@pytest.mark.slow
def test_hydra_train_runs_tiny_config(lm_data, tmp_path):
    """fairseq-hydra-train really trains configs/tiny_lm.yaml with gate=evomoe (through the spawn and
    into the dense-to-sparse phase) on shipped WikiText-2."""
    import subprocess

    from conftest import tool_path

    cmd = [
        tool_path("fairseq-hydra-train"), "--config-dir", str(CONFIGS), "--config-name", "tiny_lm", "gate=evomoe",
        f"task.data={lm_data}", f"common.user_dir={USER_DIR}", "optimization.max_update=10", "common.log_interval=1",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.no_save=true", "dataset.max_tokens=512",
        "task.tokens_per_sample=64", "dataset.validate_interval_updates=0", "dataset.disable_validation=true",
    ]
    # run in tmp_path: Hydra writes hydra_train.log into the run dir (the configs use hydra.run.dir=.)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert '"num_updates": "10"' in out and "moe_experts_per_token" in out
    assert "EvoMoE: spawned 4 experts" in out and "EvoMoE phase at update 1: soft" in out
