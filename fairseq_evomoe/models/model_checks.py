"""Checks of the model options: those that need the task, run before a model is built, and those
that must come before fairseq itself builds anything (`moe_architecture`)."""

import argparse
import logging
import os
from typing import List, Optional

import torch

from ..evomoe.options import validate_spawn_options
from ..evomoe.schedule import resolve_updates
from ..moe import options as moe_options
from ..moe.parallel.placement import distributed_world


def moe_architecture(args) -> None:
    """What every MoE architecture function does first: fill in the MoE options' defaults, and
    refuse what fairseq would otherwise stumble over before the model is built. fairseq-train calls
    the architecture function when it parses the command line, before torch.distributed is set up
    and before it opens FSDP's wrapping context around the model build (which needs fairscale)."""
    moe_options.apply_defaults(args)
    if getattr(args, "ddp_backend", None) == "fully_sharded" and args.moe_freq:
        check_fully_sharded(expected_world_size(args))


def expected_world_size(args) -> int:
    """The number of workers of this run: torch.distributed's once it is set up; before that, the
    one fairseq will set up (fairseq.distributed.utils.infer_init_method): --distributed-world-size,
    or torchrun's WORLD_SIZE where fairseq takes the launch from torchrun's environment."""
    world = distributed_world()
    if world is not None:
        return world[0]
    size = getattr(args, "distributed_world_size", 1) or 1
    torchrun = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))
    if size > 1 and getattr(args, "distributed_init_method", None) is None and torchrun:
        return int(os.environ["WORLD_SIZE"])
    return size


def check_fully_sharded(world_size: int) -> None:
    """--ddp-backend fully_sharded with an MoE model on `world_size` workers."""
    if world_size > 1:
        raise ValueError(
            f"--ddp-backend fully_sharded cannot be used with expert parallelism over {world_size} workers: FSDP would "
            "flatten and shard each worker's own experts as if they were replicated weights, and gather them "
            "across workers that hold different experts; use --ddp-backend c10d (or legacy_ddp), with "
            "--memory-efficient-fp16 to save memory (docs/distributed.md)"
        )


def prepare_moe_args(args, task, architecture, stacks):
    """The model options as every MoE model's build_model starts from them: a Namespace
    (plain_args), the architecture's defaults, validated (`stacks`: the layer stacks, e.g.
    ("encoder", "decoder"), whose `<stack>_layers` bound --moe-freq) and checked against the task."""
    args = plain_args(args)
    architecture(args)
    moe_options.validate(args, {stack: getattr(args, f"{stack}_layers") for stack in stacks})
    check_model_against_task(args, task)
    return args


def criterion_refusal(args) -> Optional[str]:
    """Why the model must not train under the run's --criterion: it is a registered criterion that
    does not add the MoE layers' losses (their routers would train without the balance loss, and
    StableMoE's stage 2 would route by an untrained table). None for an MoE criterion, or where the
    model's options do not name the criterion (fairseq-hydra-train: see `checking_before_training`)."""
    return refusal_of_criterion(getattr(args, "criterion", None))


def refusal_of_criterion(name) -> Optional[str]:
    """criterion_refusal for a criterion's registered name (None passes)."""
    from fairseq.criterions import CRITERION_REGISTRY

    from ..criterions.moe_loss import MoELossMixin

    moe = sorted(n for n, c in CRITERION_REGISTRY.items() if isinstance(c, type) and issubclass(c, MoELossMixin))
    if not isinstance(name, str) or name not in CRITERION_REGISTRY or name in moe:
        return None
    return (f"--criterion {name} does not add the MoE layers' losses (balance loss, z-loss, StableMoE's distillation), "
            f"so their routers would train without them; choose one of: {', '.join(moe)} (the same task losses plus "
            "the MoE ones)")


def checking_before_training(trainer_init):
    """fairseq's Trainer.__init__(cfg, task, model, criterion, ...), refusing, for a model with MoE
    layers, a registered criterion that does not add their losses, a gate that cannot train here
    (Gate.training_refusal) and a --restore-file that names no file (patches.py)."""
    from fairseq.criterions import CRITERION_REGISTRY

    from ..moe.layer import moe_layers

    def init(self, cfg, task, model, criterion, *args, **kwargs):
        layers = moe_layers(model)
        if layers:
            name = next((n for n, c in CRITERION_REGISTRY.items() if type(criterion) is c), None)
            why = refusal_of_criterion(name)
            if why is not None:
                raise ValueError(why.replace(f"--criterion {name}", f"--criterion {name} (criterion._name={name})", 1))
            why = next(filter(None, (layer.gate.training_refusal() for layer in layers)), None)
            if why is not None:
                raise ValueError(why)
        trainer_init(self, cfg, task, model, criterion, *args, **kwargs)
        if layers:
            why = missing_restore_file(cfg.checkpoint.restore_file, cfg.checkpoint.save_dir, self.checkpoint_suffix)
            if why is not None:
                raise ValueError(why)

    init.checks_before_training = True
    return init


def missing_restore_file(restore_file: str, save_dir: str, suffix: str) -> Optional[str]:
    """Why training must not start when --restore-file names a checkpoint that does not exist
    (fairseq would log "No existing checkpoint found" and train from scratch), else None. The
    run's own last checkpoint (the default, or <--save-dir>/checkpoint_last.pt spelled out) may be
    missing: that is a first launch."""
    from fairseq.file_io import PathManager

    if restore_file == "checkpoint_last.pt":
        return None
    path = restore_file.replace(".pt", suffix + ".pt") if suffix else restore_file
    own_last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    if PathManager.isfile(path) or os.path.abspath(path) == os.path.abspath(own_last):
        return None
    return (f"--restore-file {restore_file}: no such file{f' ({path})' if path != restore_file else ''}; "
            "fairseq would train from scratch. Give the path of an existing checkpoint, or leave "
            "--restore-file out to resume from <--save-dir>/checkpoint_last.pt")


def check_model_against_task(args, task) -> None:
    # read by the MoE layers, which refuse to train with it (generation and evaluation load
    # checkpoints whatever criterion trained them)
    args.moe_training_refused = criterion_refusal(args)
    validate_spawn_options(args)
    check_expert_parallel_options(args)
    diversify = resolve_updates(args.evomoe_diversify_updates, getattr(args, "max_update", 0) or 0, "--evomoe-diversify-updates")
    max_update = getattr(args, "max_update", 0) or 0
    never_spawned = diversify > 0 and max_update and diversify >= max_update
    plain_task = diversify > 0 and not getattr(task, "drives_evomoe_phases", False)
    # read by the layers (DiversifyPlan.plain_task): they spawn on their own, outside the optimizer
    args.evomoe_plain_task = type(task).__name__ if plain_task else None
    if (never_spawned or plain_task) and not getattr(args, "moe_rerun_schedules", False):
        # fine-tuning a model whose experts exist already: the diversify phase is over for good,
        # whatever the task and --max-update (the phase schedule is in the checkpoint). The flag is
        # stored with the options of a checkpoint whose run found so, so that loading it later
        # (generation, the hub, on another machine) does not need the checkpoint it was tuned from.
        if getattr(args, "evomoe_restores_spawned_experts", False) or experts_spawned_in(restored_checkpoint(args)):
            args.evomoe_restores_spawned_experts = True
            return
    if plain_task:
        # generation and evaluation load EvoMoE checkpoints with plain tasks, so this is no error
        logging.getLogger(__name__).warning(
            f"--evomoe-diversify-updates {args.evomoe_diversify_updates} with task {type(task).__name__}: if you train, "
            "use --task evomoe_translation, evomoe_language_modeling or evomoe_masked_lm; other tasks spawn the "
            "experts on schedule but leave the optimizer moments of the spawned weights unset, and cannot train "
            "under --fp16/--bf16 (refused at the first training step)"
        )
    if never_spawned:
        raise ValueError(
            f"--evomoe-diversify-updates ({diversify}) must be below --max-update ({max_update}): the experts would never be spawned"
        )
    unused = moe_options.unused_gate_options(args)
    if unused:
        logging.getLogger(__name__).warning(
            f"--moe-gate {args.moe_gate} ignores the options of other gates set here: {'; '.join(unused)}"
        )
    stage2 = getattr(args, "stablemoe_stage2_update", -1)
    if max_update and restored_checkpoint(args) is None:  # (a restored run keeps its checkpoint's schedule)
        for why in phases_past_the_run(args, diversify, max_update):
            logging.getLogger(__name__).warning(f"{why}, not before --max-update {max_update}: the run ends first")
        if args.moe_gate == "stablemoe" and stage2 == 0 and diversify == 0:
            logging.getLogger(__name__).warning(
                "--stablemoe-stage2-update 0 from scratch: stage 2 freezes, from the first update, a routing table "
                "distilled from a router that never trained (stage 1 never runs); 0 is meant for fine-tuning a "
                "StableMoE checkpoint. Set the update stage 2 starts from, or -1 for no stage 2")
    if args.moe_gate == "stablemoe" and diversify > 0 and 0 <= stage2 <= diversify:
        raise ValueError(
            f"--stablemoe-stage2-update ({stage2}) is not after the expert spawn at update {diversify} "
            "(--evomoe-diversify-updates): stage 1, which trains the router that stage 2's frozen table is distilled "
            f"from, would never run; set --stablemoe-stage2-update above {diversify}, or -1 for no stage 2"
        )


def phases_past_the_run(args, diversify: int, max_update: int) -> List[str]:
    """The routing phases the gate's options put at or after --max-update (each as text), for a
    warning: the DTS gate's top-1 switch or the end of its annealing, StableMoE's stage 2."""
    found = []
    if args.moe_gate == "dts":
        hard = resolve_updates(args.dts_hard_update, max_update, "--dts-hard-update")
        anneal = resolve_updates(args.dts_anneal_updates, max_update, "--dts-anneal-updates")
        if hard is not None and hard >= max_update:
            found.append(f"--dts-hard-update puts the switch to top-1 at update {hard}")
        elif hard is None and anneal is not None and diversify + anneal >= max_update:
            found.append(f"--dts-anneal-updates ({anneal}, from the spawn at update {diversify}) puts the end of "
                         f"the annealing, and the switch to top-1, at update {diversify + anneal}")
    stage2 = getattr(args, "stablemoe_stage2_update", -1)
    if args.moe_gate == "stablemoe" and stage2 >= max_update:
        found.append(f"--stablemoe-stage2-update puts StableMoE's stage 2 at update {stage2}")
    return found


def restored_checkpoint(args) -> Optional[str]:
    """The checkpoint fairseq-train will load into the model, chosen as fairseq's
    checkpoint_utils.load_checkpoint chooses it (--restore-file, else <save-dir>/checkpoint_last.pt,
    else --finetune-from-model on a first launch), or None when none exists (or outside fairseq-train)."""
    restore = getattr(args, "restore_file", None)
    if restore is None:
        return None
    if restore != "checkpoint_last.pt":
        return restore if os.path.isfile(restore) else None
    last = os.path.join(getattr(args, "save_dir", None) or "checkpoints", restore)
    if os.path.isfile(last):
        return last
    finetune = getattr(args, "finetune_from_model", None)
    return finetune if finetune and os.path.isfile(finetune) else None


def experts_spawned_in(path: Optional[str]) -> bool:
    """Whether every EvoMoE layer in the checkpoint at `path` has spawned its experts (its `spawned`
    buffers); False for no path, a checkpoint without EvoMoE layers or one that cannot be read."""
    if path is None:
        return False
    try:
        state = torch.load(path, map_location="cpu", mmap=True)
    except Exception:  # an unreadable file is fairseq's to report when it loads it
        return False
    flags = [v for k, v in (state.get("model") or {}).items() if k.endswith(".spawned")]
    return bool(flags) and all(bool(f) for f in flags)


def check_expert_parallel_options(args) -> None:
    """Options that cannot work with expert parallelism (torch.distributed with W > 1 workers)."""
    world = distributed_world()
    if world is None or world[0] == 1 or not args.moe_freq:
        return
    for option in ("encoder_layerdrop", "decoder_layerdrop"):
        value = getattr(args, option, 0) or 0
        if value > 0:
            raise ValueError(
                f"--{option.replace('_', '-')} {value} cannot be used with expert parallelism over {world[0]} workers "
                "(each worker draws its own layers to drop, and one that skips an MoE layer leaves the others "
                "waiting in its all_to_all); use 0, or train on one worker"
            )
    if getattr(args, "eval_bleu", False):
        raise ValueError(
            f"--eval-bleu cannot be used with expert parallelism over {world[0]} workers (each worker generates its "
            "own validation sentences, for its own number of decoder steps, and one that finishes first leaves the "
            "others waiting in their MoE layers' all_to_all); validate without it, and score a checkpoint with "
            "fairseq-generate on one worker"
        )
    if getattr(args, "ddp_backend", None) == "fully_sharded":
        check_fully_sharded(world[0])
    flat_fp16 = (getattr(args, "fp16", False) and not getattr(args, "bf16", False)  # --bf16 is never flat
                 and not getattr(args, "memory_efficient_fp16", False) and not getattr(args, "amp", False)
                 and not getattr(args, "fp16_no_flatten_grads", False))
    if flat_fp16:
        raise ValueError(
            f"--fp16 with expert parallelism over {world[0]} workers needs --fp16-no-flatten-grads: fairseq's flat "
            "fp32 master copy mixes each worker's own experts into one tensor, so the gradient norm would differ "
            "between workers and checkpoints would lose the other workers' optimizer state; add "
            "--fp16-no-flatten-grads (the same arithmetic, one fp32 copy per parameter) or use --memory-efficient-fp16"
        )
    optimizer = getattr(args, "optimizer", None)
    name = optimizer if isinstance(optimizer, str) or optimizer is None else getattr(optimizer, "_name", None)
    if name == "adafactor":
        raise ValueError(
            f"--optimizer adafactor cannot be used with expert parallelism over {world[0]} workers: its factored "
            "second moments and per-tensor update scaling would be computed on each worker's slice of the experts "
            "(neither the updates nor the saved state would match one process); use adam, or train on one worker"
        )


def plain_args(args):
    """fairseq-hydra-train hands models an OmegaConf DictConfig; fairseq's TransformerConfig keeps
    only the keys it knows from one, so the MoE options would be lost. A Namespace keeps them all."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(args):
        return argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
    return args
