"""Loading a checkpoint whose MoE layout differs from the run's options (another expert count, gate,
MoE layer placement...) fails with a message that names the option, the checkpoint's value and
this run's, before any weight is copied; compatible checkpoints keep loading. In-process models
built from the command line, plus one fairseq-train resume end to end."""

import hashlib
import shutil

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

import fairseq_evomoe  # noqa: F401  (registers the architectures)
from fairseq_evomoe.models.checkpoint_checks import CheckpointMismatchError, gate_states
from fairseq_evomoe.moe.gates.base import GATE_REGISTRY, Gate, register_gate
from fairseq_evomoe.moe.layer import moe_layers

LM = ("language_modeling", "transformer_lm_moe_tiny")
MT = ("translation", "transformer_moe_tiny")
MLM = ("masked_lm", "roberta_moe_tiny")


def build(*extra, kind=LM):
    """A tiny MoE model (task, arch) from the command-line parser, seeded."""
    task_name, arch = kind
    vocab = Dictionary()
    for i in range(40):
        vocab.add_symbol(f"w{i}")
    vocab.add_symbol("<mask>")

    class Task:
        source_dictionary = target_dictionary = vocab

        @staticmethod
        def max_positions():
            return 64

    argv = ["/nonexistent", "--task", task_name, "--arch", arch, "--max-update", "100", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    torch.manual_seed(0)
    return ARCH_MODEL_REGISTRY[args.arch].build_model(args, Task())


def load_error(saved_args, run_args, kind=LM, strict=True) -> str:
    """The message of loading the state dict of a model built with `saved_args` into one built with
    `run_args`; also checks that nothing was copied before the error."""
    state = build(*saved_args, kind=kind).state_dict()
    model = build(*run_args, kind=kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        model.load_state_dict(state, strict=strict)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was partly loaded before the error"
    return str(err.value)


FIX = "To load it, run with the checkpoint's values"


@pytest.mark.parametrize("saved, run, expected", [
    (["--moe-expert-count", "4"], ["--moe-expert-count", "8"],
     ["--moe-expert-count: the checkpoint has 4 experts in each MoE layer; this run asked for 8", "(--moe-expert-count 4)"]),
    (["--moe-gate", "top1"], ["--moe-gate", "hash"],
     ["--moe-gate: the checkpoint's MoE layers were trained with one of the gates top1, top2, base or dense_moe",
      "this run asked for --moe-gate hash (gate state: table)", "(--moe-gate top1/top2/base/dense_moe)"]),
    (["--moe-gate", "hash"], ["--moe-gate", "dts"],
     ["--moe-gate: the checkpoint's MoE layers were trained with the hash gate (gate state: table); "
      "this run asked for --moe-gate dts (gate state: router.wg.weight, schedule_position, schedule_updates)", "(--moe-gate hash)"]),
    (["--moe-gate", "dts"], ["--moe-gate", "top1"],
     ["trained with the dts gate", "this run asked for --moe-gate top1", "(--moe-gate dts)"]),
    (["--moe-gate", "stablemoe"], ["--moe-gate", "top2"],
     ["trained with the stablemoe gate", "this run asked for --moe-gate top2", "(--moe-gate stablemoe)"]),
    (["--moe-freq", "1"], ["--moe-freq", "2"],
     ["--moe-freq: the checkpoint has MoE FFNs in decoder layers [0, 1] (--moe-freq 1); "
      "this run asked for MoE FFNs in decoder layers [1] (--moe-freq 2)", "(--moe-freq 1)"]),
    (["--moe-freq", "2", "--decoder-layers", "4"], ["--moe-freq", "4", "--decoder-layers", "4"],
     ["the checkpoint has MoE FFNs in decoder layers [1, 3] (--moe-freq 2); "
      "this run asked for MoE FFNs in decoder layers [3] (--moe-freq 4)"]),
    (["--moe-freq", "2"], ["--moe-freq", "0"],
     ["the checkpoint has MoE FFNs in decoder layers [1] (--moe-freq 2); this run asked for no MoE FFN in the decoder"]),
    (["--decoder-layers", "4"], ["--decoder-layers", "2"],
     ["--decoder-layers: the checkpoint has 4 decoder layers; this run asked for 2", "(--decoder-layers 4"]),
    (["--moe-expert-ffn-dim", "64"], ["--moe-expert-ffn-dim", "96"],
     ["--moe-expert-ffn-dim (default: --decoder-ffn-embed-dim): the checkpoint's experts have a hidden size of 64; "
      "this run asked for 96", "(--moe-expert-ffn-dim 64)"]),
    # the expert size left at its default: the dense FFN size is the one to give back
    (["--decoder-ffn-embed-dim", "64"], ["--decoder-ffn-embed-dim", "96"],
     ["--decoder-ffn-embed-dim: the checkpoint's dense FFNs have a hidden size of 64; this run asked for 96",
      "the checkpoint's experts have a hidden size of 64; this run asked for 96", "(--decoder-ffn-embed-dim 64)"]),
    (["--decoder-ffn-embed-dim", "64", "--moe-expert-ffn-dim", "32"], ["--decoder-ffn-embed-dim", "96"],
     ["(--decoder-ffn-embed-dim 64 --moe-expert-ffn-dim 32)"]),
    (["--moe-gate", "stablemoe", "--stablemoe-distill-dim", "32"], ["--moe-gate", "stablemoe", "--stablemoe-distill-dim", "16"],
     ["--stablemoe-distill-dim: the checkpoint's gates have 32; this run asked for 16", "(--stablemoe-distill-dim 32)"]),
    (["--moe-gate", "dts"], ["--arch", "transformer_lm_evomoe_tiny"],
     ["--evomoe-diversify-updates: the checkpoint's MoE layers have no expert-diversify phase",
      "this run asked for one", "(--evomoe-diversify-updates 0)"]),
    (["--moe-expert-count", "8", "--moe-gate", "hash", "--moe-freq", "1"], ["--moe-expert-count", "4"],
     ["--moe-expert-count: the checkpoint has 8 experts", "this run asked for 4", "--moe-gate: ", "--moe-freq: ",
      "(--moe-freq 1 --moe-expert-count 8 --moe-gate hash)"]),
])
def test_mismatch_names_the_option_and_both_values(saved, run, expected):
    message = load_error(saved, run)
    for text in expected + [FIX, "--reset-* options reset the optimizer, meters and data loader, not the model's architecture"]:
        assert text in message, message


def test_translation_and_roberta_models():
    message = load_error(["--moe-expert-count", "4"], ["--moe-expert-count", "2"], kind=MT)
    assert message.count("--moe-expert-count: the checkpoint has 4 experts in each MoE layer; this run asked for 2") == 1
    message = load_error(["--moe-freq", "1"], ["--moe-freq", "2"], kind=MT)
    assert "the checkpoint has MoE FFNs in encoder layers [0, 1] (--moe-freq 1)" in message
    assert "the checkpoint has MoE FFNs in decoder layers [0, 1] (--moe-freq 1)" in message
    message = load_error(["--moe-freq", "2"], ["--moe-freq", "1"], kind=MLM)  # keys encoder.sentence_encoder.layers.*
    assert ("--moe-freq: the checkpoint has MoE FFNs in encoder layers [1] (--moe-freq 2); "
            "this run asked for MoE FFNs in encoder layers [0, 1] (--moe-freq 1)") in message
    assert "--moe-gate: the checkpoint's MoE layers were trained with the hash gate" in load_error(
        ["--moe-gate", "hash"], ["--moe-gate", "top1"], kind=MLM)


def test_a_non_strict_load_is_checked_only_for_shapes():
    """strict=False tolerates missing and unexpected keys (another gate or placement), never shapes."""
    model = build("--moe-gate", "hash")
    model.load_state_dict(build("--moe-gate", "top1").state_dict(), strict=False)
    assert "--moe-expert-count: the checkpoint has 4 experts" in load_error(
        ["--moe-expert-count", "4"], ["--moe-expert-count", "8"], strict=False)


def _loads(saved_state, *run_args, kind=LM):
    model = build(*run_args, kind=kind)
    model.load_state_dict(saved_state, strict=True)
    return model


@pytest.mark.parametrize("saved, run", [
    ([], []),
    (["--moe-gate", "top1"], ["--moe-gate", "top2"]),  # same state: these always loaded into one another
    (["--moe-gate", "top1"], ["--moe-gate", "dts"]),  # the DTS gate fills its schedule_updates buffer itself
    (["--arch", "transformer_lm_evomoe_tiny"], ["--arch", "transformer_lm_evomoe_tiny"]),
    (["--arch", "transformer_lm_evomoe_tiny"], ["--moe-gate", "dts"]),  # the layer drops its spawn buffers
    (["--moe-freq", "0"], ["--moe-freq", "2"]),  # a dense checkpoint is upcycled (tests/test_moe_models.py)
    (["--moe-gate", "hash", "--moe-expert-count", "8", "--moe-freq", "1"],
     ["--moe-gate", "hash", "--moe-expert-count", "8", "--moe-freq", "1"]),
])
def test_compatible_checkpoints_still_load(saved, run):
    state = build(*saved).state_dict()
    model = _loads(state, *run)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


def test_a_gate_that_fills_its_own_state_warns_when_it_loads_another_gates_checkpoint(caplog):
    """A top-1 checkpoint loads into the DTS gate (which fills its schedule buffers itself), so a
    run resumed with the wrong --moe-gate would silently become another method: it is said."""
    state = build("--moe-gate", "top1").state_dict()
    with caplog.at_level("WARNING"):
        _loads(dict(state), "--moe-gate", "dts")
    said = [r.getMessage() for r in caplog.records if "this run loads them into --moe-gate dts" in r.getMessage()]
    assert said and "keep the state of --moe-gate top1/" in said[0] and "Pass that gate" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        _loads(dict(state), "--moe-gate", "top2")  # the same state: nothing to say
        _loads(build("--moe-gate", "dts").state_dict(), "--moe-gate", "dts")
    assert not [r for r in caplog.records if "this run loads them into" in r.getMessage()]


def test_older_checkpoints_with_the_legacy_buffers_in_every_layer_still_load():
    state = build("--moe-freq", "1").state_dict()
    for i in (0, 1):
        state[f"decoder.layers.{i}.moe.spawned"] = torch.tensor(False)
        state[f"decoder.layers.{i}.moe.spawn_update"] = torch.tensor(-1)
    _loads(dict(state), "--moe-freq", "1")
    with pytest.raises(CheckpointMismatchError) as err:  # the buffers do not hide a real mismatch
        _loads(dict(state), "--moe-freq", "1", "--moe-expert-count", "2")
    assert "the checkpoint has 4 experts in each MoE layer; this run asked for 2" in str(err.value)


@pytest.mark.parametrize("gate", sorted(GATE_REGISTRY))
def test_every_gate_declares_the_state_it_writes_and_the_older_states_it_loads(gate):
    """The check names a checkpoint's gate by the state keys each registered gate declares
    (`state_keys`): the first set is what the gate writes today, the others older sets it still loads."""
    declared = GATE_REGISTRY[gate].cls.state_keys
    assert declared and len(set(declared)) == len(declared), f"gate {gate} declares {declared}"
    model = build("--moe-gate", gate)
    prefix = "decoder.layers.1.moe.gate."
    state = model.state_dict()
    assert frozenset(k[len(prefix):] for k in state if k.startswith(prefix)) == declared[0]
    assert gate in gate_states()[declared[0]]
    for older in declared[1:]:
        old_state = {k: v for k, v in state.items() if not k.startswith(prefix) or k[len(prefix):] in older}
        _loads(old_state, "--moe-gate", gate)


def test_a_gate_that_declares_no_state_keys_is_not_registered():
    with pytest.raises(ValueError, match="gate 'undeclared' \\(Undeclared\\) declares no state_keys"):
        @register_gate("undeclared")
        class Undeclared(Gate):
            pass
    assert "undeclared" not in GATE_REGISTRY


def _shard(model, world_size, rank):
    """The model as worker `rank` of `world_size` holds it under expert parallelism (no process group
    is needed to load a state dict)."""
    from fairseq_evomoe.moe.parallel.checkpoint import install_checkpoint_hooks
    from fairseq_evomoe.moe.parallel.placement import ExpertPlacement
    from fairseq_evomoe.moe.parallel.sharding import shard_experts

    for moe in moe_layers(model):
        placement = ExpertPlacement(moe.num_experts, world_size, rank)
        shard_experts(moe.experts, placement)
        install_checkpoint_hooks(moe.experts, placement)
        moe.placement = placement
    return model


def test_expert_parallel_loads_compare_the_full_expert_count():
    """A checkpoint always holds all E experts; a worker holding E/W of them loads its slice, and the
    check compares the checkpoint's E with the model's global E, not with the local slice."""
    state = build("--moe-expert-count", "4").state_dict()
    worker = _shard(build("--moe-expert-count", "4"), world_size=2, rank=1)
    worker.load_state_dict(state, strict=True)
    moe = moe_layers(worker)[0]
    assert moe.experts.fc1_weight.shape[0] == 2
    assert torch.equal(moe.experts.fc1_weight, state["decoder.layers.1.moe.experts.fc1_weight"][2:4])

    wrong = build("--moe-expert-count", "8").state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        _shard(build("--moe-expert-count", "4"), world_size=2, rank=0).load_state_dict(wrong, strict=True)
    assert "the checkpoint has 8 experts in each MoE layer; this run asked for 4" in str(err.value)


# -- end to end -------------------------------------------------------------------------------------


def _fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, path.stat().st_size


@pytest.mark.slow
def test_cli_resume_with_another_expert_count_fails_before_training(lm_data, tiny_lm_checkpoint, tmp_path):
    """A checkpoint of 4 experts (tiny_lm_checkpoint, copied) resumed with --moe-expert-count 8: refused
    before training, the checkpoint and its folder untouched."""
    from conftest import run_cli, tiny_lm_args

    save = tmp_path / "ckpt"
    shutil.copytree(tiny_lm_checkpoint[0], save)
    ckpt = save / "checkpoint_last.pt"
    saved_files = sorted(p.name for p in save.iterdir())
    before = _fingerprint(ckpt)

    proc = run_cli("fairseq-train", *tiny_lm_args(lm_data, save), "--max-update", "4", "--moe-expert-count", "8",
                   "--restore-file", ckpt, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "--moe-expert-count: the checkpoint has 4 experts in each MoE layer; this run asked for 8" in text, text[-4000:]
    assert "(--moe-expert-count 4)" in text
    assert "train_inner" not in text and "begin training epoch" not in text
    assert _fingerprint(ckpt) == before
    assert sorted(p.name for p in save.iterdir()) == saved_files
