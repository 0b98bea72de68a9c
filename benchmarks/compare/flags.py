"""The fairseq-train command of one comparison run: the gate's options from configs/gate/<gate>.yaml
(the same files fairseq-hydra-train uses) and, for gate=evomoe, the evomoe_* phase task from
configs/evomoe_task, added to the model, data and optimisation flags the comparison shares.

The schedule values derived from --updates are functions here, so that the training command and
the report's description of it cannot disagree."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from . import REPO

ALL_GATES = ["dense", "switch", "top2", "base", "hash", "stablemoe", "dense_moe", "evomoe", "evomoe_scheduled"]
DEFAULT_GATES = ["dense", "switch", "top2", "base", "hash", "stablemoe", "evomoe"]
TASKS = {"lm": "language_modeling", "mt": "translation"}

# model sizes: (layers per stack, model dim, ffn dim, heads); moe_freq 2 -> every other layer is MoE
SIZES = {
    "tiny": (2, 64, 256, 2),
    "small": (4, 128, 512, 4),
    "base": (6, 512, 2048, 8),
}


def warmup_updates(updates: int) -> int:
    """Warm-up of the inverse_sqrt learning-rate schedule: the first 10% of the updates."""
    return max(1, updates // 10)


def stablemoe_stage2_update(updates: int) -> int:
    """The update at which StableMoE freezes its routing (stage 2): after 10% of the updates."""
    return max(1, round(0.1 * updates))


def validation_interval(a: argparse.Namespace) -> int:
    """Updates between intermediate validations, for --validations of them over the run."""
    return max(1, a.updates // a.validations)


def checkpoint_interval(a: argparse.Namespace) -> int:
    """Updates between the checkpoints a run saves: at every validation, so that an interrupted run
    resumes from its last one (saving changes nothing the run computes)."""
    return validation_interval(a)


def fairseq_tool(name: str) -> str:
    """The fairseq console script installed next to this Python, else `name` (looked up on PATH)."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def config_flags(cfg: dict) -> List[str]:
    """Command-line flags for a gate config: key_name: value -> --key-name value, a true bool -> --key-name
    (a false one -> nothing); Hydra interpolations (e.g. max_update: ${optimization.max_update}) are
    skipped, since fairseq-train gets those values from its own flags."""
    args = []
    for k, v in cfg.items():
        if isinstance(v, str) and v.startswith("${"):
            continue
        flag = "--" + str(k).replace("_", "-")
        if isinstance(v, bool):
            if v:
                args.append(flag)
        else:
            args += [flag, str(v)]
    return args


def config_path(group: str, name: str, extra_dir: Optional[Path] = None) -> Optional[Path]:
    """<extra_dir>/<name>.yaml (for gate configs given with --gate-dir) or configs/<group>/<name>.yaml,
    whichever exists first; None when neither does."""
    for folder in ([extra_dir] if extra_dir else []) + [REPO / "configs" / group]:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def load_group_config(group: str, name: str, extra_dir: Optional[Path] = None) -> dict:
    """configs/<group>/<name>.yaml (or <extra_dir>/<name>.yaml) as a dict, with the configs its Hydra
    `defaults` list names merged in first (as Hydra does; `_self_` last); a config in extra_dir that
    names itself there extends configs/<group>/<name>.yaml. SystemExit naming --gates when it is missing."""
    from omegaconf import OmegaConf

    path = config_path(group, name, extra_dir)
    if path is None:
        raise SystemExit(f"--gates: no config {name}.yaml for gate {name!r} in configs/{group}"
                         f"{f' or {extra_dir}' if extra_dir else ''}; choose from {', '.join(ALL_GATES)}")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    merged: dict = {}
    for entry in own.pop("defaults", []):
        if entry != "_self_":
            merged.update(load_group_config(group, entry, None if entry == name else extra_dir))
    merged.update(own)
    return merged


def phase_task(gate: str, task_name: str, extra_dir: Optional[Path] = None) -> Optional[str]:
    """The evomoe_* task of a gate config: configs/evomoe_task/<gate>_<task>.yaml of the gate or of
    the first config its `defaults` name that has one (a variant of gate=evomoe runs evomoe's task).
    Such a file is in package `task`, or `_global_` with a `task` section (when it also sets the
    criterion: the harness keeps its own, --balance-wt, for every gate)."""
    from omegaconf import OmegaConf

    if (REPO / "configs" / "evomoe_task" / f"{gate}_{task_name}.yaml").is_file():
        cfg = load_group_config("evomoe_task", f"{gate}_{task_name}")
        return cfg["task"]["_name"] if "task" in cfg else cfg["_name"]
    path = config_path("gate", gate, extra_dir)
    for entry in (OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("defaults", []) if path else []):
        found = phase_task(entry, task_name, extra_dir) if entry != "_self_" else None
        if found:
            return found
    return None


# The DTS gate's options whose defaults changed on 2026-12-07 (docs/evomoe_diagnosis.md), with
# today's defaults (tests/test_compare_efficiency.py pins them to the code's). The harness passes
# them explicitly to every DTS run, so a recorded command says what the run did whatever the
# code's defaults; a command recorded before then ran with DTS_DEFAULTS_BEFORE.
DTS_DEFAULTS = {"--dts-hard-routing": "argmax", "--moe-soft-gate-loss-wt": "0"}
DTS_DEFAULTS_BEFORE = {"--dts-hard-routing": "sample", "--moe-soft-gate-loss-wt": "-1"}


def is_dts(args: List[str]) -> bool:
    return "--moe-gate" in args and args[args.index("--moe-gate") + 1 :][:1] == ["dts"]


def split_dts_defaults(args: List[str], defaults: dict) -> Tuple[List[str], dict]:
    """(args without the DTS_DEFAULTS flags, {flag: value as a number or word}): a flag that args
    do not give takes its value in `defaults` (for a DTS gate; other gates: {})."""
    rest, values = list(args), {}
    for flag in DTS_DEFAULTS:
        if flag in rest:
            i = rest.index(flag)
            values[flag] = rest[i + 1]
            del rest[i : i + 2]
        elif is_dts(args):
            values[flag] = defaults[flag]
    return rest, {f: float(v) if v.lstrip("-").replace(".", "", 1).isdigit() else v for f, v in values.items()}


def gate_options(gate: str, task: str, extra_dir: Optional[Path] = None) -> Tuple[str, List[str]]:
    """fairseq-train options (and the task name) from configs/gate/<gate>.yaml and configs/evomoe_task."""
    args = config_flags(load_group_config("gate", gate, extra_dir))
    return phase_task(gate, TASKS[task], extra_dir) or TASKS[task], args


def gate_options_for(a: argparse.Namespace, gate: str, task: str) -> Tuple[str, List[str]]:
    """gate_options with this invocation's EvoMoE choices (--spawn-mode, --tau-schedule), where given,
    in place of the gate config's."""
    task_name, args = gate_options(gate, task, getattr(a, "gate_dir", None))
    for flag, val in (("--evomoe-spawn-mode", a.spawn_mode), ("--dts-tau-schedule", a.tau_schedule)):
        if val is not None and flag in args:
            args[args.index(flag) + 1] = val
    if is_dts(args):
        args += [x for flag, val in DTS_DEFAULTS.items() if flag not in args for x in (flag, val)]
    return task_name, args


def model_flags(a: argparse.Namespace, task: str) -> List[str]:
    """Architecture and criterion: a GPT-style decoder for lm, an encoder-decoder (De->En) for mt."""
    layers, dim, ffn, heads = SIZES[a.size]
    if task == "lm":
        return [
            "--arch", "transformer_lm_moe_tiny", "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
            "--decoder-ffn-embed-dim", str(ffn), "--decoder-attention-heads", str(heads),
            "--share-decoder-input-output-embed", "--tokens-per-sample", str(a.tokens_per_sample),
            "--sample-break-mode", "none", "--criterion", "moe_cross_entropy",
        ]
    return [
        "-s", "de", "-t", "en", "--arch", "transformer_moe_tiny",
        "--encoder-layers", str(layers), "--decoder-layers", str(layers),
        "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim),
        "--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn),
        "--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads),
        "--share-all-embeddings", "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--dropout", "0.1",
    ]


def train_command(a: argparse.Namespace, task: str, gate: str, seed: int, data: Path, run_dir: Path) -> List[str]:
    """The fairseq-train command of one run: data from `data`/bin, checkpoints, JSON log and
    validations in `run_dir`; the checkpoint of the latest validation is kept (and checkpoint_last.pt)."""
    task_name, gate_args = gate_options_for(a, gate, task)
    n = a.updates
    common = [
        fairseq_tool("fairseq-train"), str(data / "bin"), "--user-dir", str(REPO / "fairseq_evomoe"),
        "--task", task_name, "--seed", str(seed), "--max-update", str(n),
        "--moe-expert-count", str(a.experts), "--moe-freq", "2",
        "--stablemoe-stage2-update", str(stablemoe_stage2_update(n)),
        "--moe-gate-loss-wt", str(a.balance_wt), "--moe-log-expert-load",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(a.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(warmup_updates(n)),
        "--max-tokens", str(a.max_tokens), "--save-dir", str(run_dir / "ckpt"),
        "--no-epoch-checkpoints", "--save-interval", "1000000", "--save-interval-updates", str(checkpoint_interval(a)),
        "--keep-interval-updates", "1", "--validate-interval", "1000000",
        "--validate-interval-updates", str(validation_interval(a)), "--max-valid-steps", str(a.max_valid_steps),
        "--log-format", "json", "--log-interval", str(max(1, min(10, n // 20))),
        "--log-file", str(run_dir / "train.log"), "--num-workers", "0",
    ]
    if not a.gpu:
        common.append("--cpu")
    return common + model_flags(a, task) + gate_args
