"""MoE models built from the command line, run forward and backward in-process (no fairseq-train):
how the MoE layers behave under fairseq's activation checkpointing and LayerDrop."""

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

import fairseq_evomoe  # noqa: F401  (registers the architectures)
from fairseq_evomoe.criterions.moe_criterions import MoECrossEntropyCriterion
from fairseq_evomoe.moe.layer import moe_layers


def build_lm(*extra):
    vocab = Dictionary()
    for i in range(40):
        vocab.add_symbol(f"w{i}")

    class Task:
        source_dictionary = target_dictionary = vocab

    parser = options.get_training_parser()
    argv = ["/nonexistent", "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny",
            "--criterion", "moe_cross_entropy", "--moe-capacity-factor", "1.0", *extra]
    args = options.parse_args_and_arch(parser, argv)
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY[args.arch].build_model(args, Task())
    criterion = MoECrossEntropyCriterion(Task(), False, 1.0, "average", 0.0, False)
    return model.train(), criterion, vocab


def lm_sample(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab.nspecial, len(vocab), (2, 8), generator=g)
    tokens[1, 5:] = vocab.pad()
    target = tokens.roll(-1, 1).masked_fill(tokens == vocab.pad(), vocab.pad())
    return {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([8, 5])},
            "target": target, "ntokens": int((target != vocab.pad()).sum()), "id": torch.arange(2)}


@pytest.mark.parametrize("gate", ["top1", "hash"])
def test_checkpoint_activations_keeps_the_balance_loss_and_skips_padding(gate):
    """fairseq's checkpoint wrapper recomputes a layer in the backward without the routing context;
    MoE layers are left unwrapped so the balance loss keeps its gradient and padding is never routed,
    while the dense layers are still checkpointed."""
    model, criterion, vocab = build_lm("--checkpoint-activations", "--moe-gate", gate, "--moe-freq", "2",
                                       "--decoder-layers", "2")
    layers = model.decoder.layers
    assert hasattr(layers[0], "precheckpoint_forward")  # fairseq's checkpoint wrapper on the dense layer
    assert not hasattr(layers[1], "precheckpoint_forward")  # the MoE layer
    loss, _, log = criterion(model, lm_sample(vocab))
    moe = moe_layers(model)[0]
    assert moe.metadata["num_tokens"].item() == 13  # 16 positions, 3 of them padding
    loss.backward()  # the hash gate used to fail here: the recompute had no token ids
    assert moe.metadata["num_tokens"].item() == 13  # no second forward without the routing context
    if gate == "top1":  # the hash gate has no router and no balance loss
        assert moe.metadata["balance_loss"].requires_grad
        assert moe.gate.router.wg.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gate", ["top1", "stablemoe"])
def test_training_under_a_criterion_without_the_moe_losses_is_refused(gate):
    """--criterion cross_entropy on an MoE model would train the routers without the balance loss
    (StableMoE: its stage 2 would route by a table distilled from nothing): the first training
    forward refuses, naming the option and the MoE criteria; evaluation of such a model runs."""
    model, criterion, vocab = build_lm("--moe-gate", gate, "--criterion", "cross_entropy")
    sample = lm_sample(vocab)
    with pytest.raises(ValueError, match=r"--criterion cross_entropy .*choose one of: .*moe_cross_entropy.*moe_label_smoothed_cross_entropy"):
        model(**sample["net_input"])
    model.eval()
    assert model(**sample["net_input"])[0].shape[:2] == (2, 8)
    ok, _, _ = build_lm("--moe-gate", gate)  # moe_cross_entropy
    ok(**sample["net_input"])


def test_fairseqs_trainer_refuses_a_criterion_without_the_moe_losses():
    """fairseq-hydra-train's model options do not name the criterion, so the model cannot refuse
    it: fairseq's Trainer does, before it is built (patches.py), for MoE models only."""
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion
    from fairseq.trainer import Trainer

    model, moe_criterion, vocab = build_lm()  # its options name moe_cross_entropy, as Hydra's name none
    plain = CrossEntropyCriterion(type("Task", (), {"target_dictionary": vocab})(), False)
    with pytest.raises(ValueError, match=r"--criterion cross_entropy \(criterion._name=cross_entropy\) does not add "
                                         r"the MoE layers' losses.*choose one of: .*moe_cross_entropy"):
        Trainer(None, None, model, plain)  # refused before fairseq reads its config
    dense, _, _ = build_lm("--moe-freq", "0")
    for ok_model, ok_criterion in ((model, moe_criterion), (dense, plain)):
        with pytest.raises(AttributeError):  # got past the check, into fairseq's own __init__ (cfg None)
            Trainer(None, None, ok_model, ok_criterion)


def test_options_of_a_gate_that_is_not_chosen_are_warned_about(caplog):
    """--hash-mode balanced without --moe-gate hash trains the chosen gate: say so. The stage-2 update
    the shipped configs set for every gate, and the EvoMoE architectures' own defaults, are quiet."""
    import logging

    def warned(*argv):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build_lm(*argv)
        return [r.getMessage() for r in caplog.records if "ignores the options of other gates" in r.getMessage()]

    assert warned("--moe-gate", "top1", "--hash-mode", "balanced", "--moe-second-expert-policy", "random") == [
        "--moe-gate top1 ignores the options of other gates set here: --hash-mode balanced (--moe-gate hash); "
        "--moe-second-expert-policy random (--moe-gate top2)"]
    assert warned("--moe-gate", "hash", "--hash-mode", "balanced") == []
    assert warned("--moe-gate", "top1", "--stablemoe-stage2-update", "100") == []
    assert warned("--arch", "transformer_lm_evomoe_tiny", "--moe-gate", "top1", "--max-update", "100") == []
    assert warned("--arch", "transformer_lm_evomoe_tiny", "--max-update", "100") == []  # the DTS gate


def test_a_restore_file_that_names_no_file_is_refused_but_a_first_launch_is_not(tmp_path):
    from fairseq_evomoe.models.model_checks import missing_restore_file

    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "pretrained.pt").write_bytes(b"x")
    assert missing_restore_file("checkpoint_last.pt", str(save), "") is None  # the default, first launch
    assert missing_restore_file(str(save / "checkpoint_last.pt"), str(save), "") is None  # the same, spelled out
    assert missing_restore_file(str(save / "pretrained.pt"), str(save), "") is None
    why = missing_restore_file(str(save / "pretrianed.pt"), str(save), "")
    assert why.startswith(f"--restore-file {save / 'pretrianed.pt'}: no such file; fairseq would train from scratch")
    # fairseq appends --checkpoint-suffix to the file it loads
    assert missing_restore_file(str(save / "pretrained.pt"), str(save), "-x") == (
        f"--restore-file {save / 'pretrained.pt'}: no such file ({save / 'pretrained-x.pt'}); fairseq would train "
        "from scratch. Give the path of an existing checkpoint, or leave --restore-file out to resume from "
        "<--save-dir>/checkpoint_last.pt")
    assert missing_restore_file(str(save / "checkpoint_last.pt"), str(save), "-x") is None


@pytest.mark.parametrize("gate", ["top1", "dts"])
def test_fairseqs_nan_detector_runs_on_moe_models(gate):
    """After a NaN gradient fairseq repeats the step under its NanDetector, which hooks every module
    (backward hooks included); an MoE model must let it report, not fail on the gate's output."""
    from fairseq.nan_detector import NanDetector

    model, criterion, vocab = build_lm("--moe-gate", gate)
    with NanDetector(model):
        loss, _, _ = criterion(model, lm_sample(vocab))
        loss.backward()
    assert model.decoder.layers[1].moe.gate.router.wg.weight.grad is not None


def test_layer_skipped_by_layerdrop_reports_nothing():
    """A layer LayerDrop skips must not hand the criterion the losses of an earlier batch (whose
    graph is gone: the backward would fail)."""
    model, criterion, vocab = build_lm("--moe-freq", "1", "--decoder-layers", "2", "--decoder-layerdrop", "0.5")
    first, second = moe_layers(model)
    seen = set()
    for step in range(12):
        torch.manual_seed(step)
        loss, _, log = criterion(model, lm_sample(vocab, seed=step))
        ran = tuple(bool(m.metadata) for m in (first, second))
        seen.add(ran)
        loss.backward()  # would raise "backward through the graph a second time" with stale losses
        if not any(ran):
            assert log["moe_gate_loss"] == 0
    assert len(seen) > 1  # LayerDrop did skip layers in some steps and not in others


@pytest.mark.parametrize("option, value, message", [
    ("decoder_layerdrop", 0.2, "--decoder-layerdrop 0.2 cannot be used with expert parallelism over 2 workers"),
    ("encoder_layerdrop", 0.1, "--encoder-layerdrop 0.1 cannot be used with expert parallelism over 2 workers"),
    ("optimizer", "adafactor", "--optimizer adafactor cannot be used with expert parallelism over 2 workers"),
    ("eval_bleu", True, "--eval-bleu cannot be used with expert parallelism over 2 workers"),
])
def test_options_that_cannot_work_with_expert_parallelism_are_refused(monkeypatch, option, value, message):
    """LayerDrop would leave workers waiting in each other's all_to_all (each draws its own drops);
    Adafactor's factored moments would be computed on each worker's slice of the experts."""
    from argparse import Namespace

    from fairseq_evomoe.models import model_checks

    args = Namespace(moe_freq=2, encoder_layerdrop=0.0, decoder_layerdrop=0.0, optimizer="adam")
    model_checks.check_expert_parallel_options(args)  # one process: nothing to check
    monkeypatch.setattr(model_checks, "distributed_world", lambda: (2, 0))
    model_checks.check_expert_parallel_options(args)  # fine on 2 workers
    setattr(args, option, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_checks.check_expert_parallel_options(args)
    args.moe_freq = 0  # a dense model has no expert parallelism
    model_checks.check_expert_parallel_options(args)


class ReachedFSDP(Exception):
    """fairseq-train opened FSDP's wrapping context, the first thing that needs fairscale."""


def test_fully_sharded_with_expert_parallelism_is_refused_before_fairseq_needs_fairscale(tmp_path, monkeypatch, fairseq_config_conversion):
    """fairseq-train opens FSDP's wrapping context (which imports fairscale) before it builds the model,
    so where fairscale is not installed a refusal at model build never showed: fairseq stopped with
    "Please install fairscale". The plugin refuses while fairseq-train parses the command line. Here
    fairseq's `call_main` runs `main` in this process (nothing starts the workers) and its FSDP context
    raises ReachedFSDP."""
    import sys

    import fairseq_cli.train as train
    from conftest import USER_DIR

    def fsdp_enable_wrap(cfg):
        raise ReachedFSDP

    monkeypatch.setattr(train, "fsdp_enable_wrap", fsdp_enable_wrap)
    monkeypatch.setattr(train.distributed_utils, "call_main", lambda cfg, main: main(cfg))
    for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(10)))

    def train_with(*extra):
        monkeypatch.setattr(sys, "argv", [
            "fairseq-train", str(tmp_path), "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "transformer_lm_moe_tiny", "--max-tokens", "64", "--save-dir", str(tmp_path / "ckpt"),
            "--cpu", "--ddp-backend", "fully_sharded", *extra])
        train.cli_main()

    refused = "--ddp-backend fully_sharded cannot be used with expert parallelism over {} workers: FSDP"
    with pytest.raises(ValueError, match=refused.format(2)):
        train_with("--distributed-world-size", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # torchrun's environment: fairseq takes its WORLD_SIZE
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=refused.format(4)):
        train_with("--distributed-world-size", "2")
    # fairseq's own business: one worker (fairseq ignores torchrun's environment then), or no MoE layer
    with pytest.raises(ReachedFSDP):
        train_with("--distributed-world-size", "1")
    with pytest.raises(ReachedFSDP):
        train_with("--distributed-world-size", "2", "--moe-freq", "0")


def test_torchrun_entry_point_keeps_the_users_options():
    from fairseq_evomoe.distributed.train import torchrun_args

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "1"}
    out = torchrun_args(["DATA", "--device-id", "0", "--distributed-world-size=2"], env)
    assert out.count("--device-id") == 1 and out[out.index("--device-id") + 1] == "0"
    assert not any(a.startswith("--distributed-world-size ") or a == "--distributed-world-size" for a in out)
    assert out[out.index("--distributed-rank") + 1] == "1" and "--distributed-no-spawn" in out
    assert torchrun_args(["DATA"], {}) == ["DATA"]  # without torchrun's environment: unchanged


def test_expert_dtype_option_reaches_every_moe_layer():
    """--moe-expert-dtype bf16: every MoE layer's experts compute in bf16 and hand the model back its
    own dtype; the loss is within bf16 rounding of the default model's and has gradients."""
    losses = {}
    for dtype in ("auto", "bf16"):
        model, criterion, vocab = build_lm("--moe-expert-dtype", dtype, "--moe-freq", "1", "--decoder-layers", "2")
        layers = moe_layers(model)
        assert len(layers) == 2
        assert all(m.experts.compute_dtype == (torch.bfloat16 if dtype == "bf16" else None) for m in layers)
        loss, _, _ = criterion(model, lm_sample(vocab))
        loss.backward()
        assert loss.dtype == torch.float32 and layers[0].experts.fc1_weight.grad.dtype == torch.float32
        losses[dtype] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["auto"], rel=2e-2)


def test_checkpoint_with_evomoe_buffers_in_every_layer_loads():
    """Checkpoints written before EvoMoE's layer became a subclass of the MoE layer stored its
    `spawned` and `spawn_update` buffers in every MoE layer; they still load (strictly) into a model
    without an expert-diversify phase, and a model with one keeps its own."""
    model, _, _ = build_lm()
    state = model.state_dict()
    layers = [k[: -len(".gate.router.wg.weight")] for k in state if k.endswith(".moe.gate.router.wg.weight")]
    assert layers and not any(k.endswith(".moe.spawned") for k in state)
    old = {**state, **{f"{m}.spawned": torch.tensor(True) for m in layers},
           **{f"{m}.spawn_update": torch.tensor(-1) for m in layers}}
    model.load_state_dict(old, strict=True)  # fairseq's load_state_dict upgrades the dict first

    evo, _, _ = build_lm("--evomoe-diversify-updates", "5", "--max-update", "10")
    evo_state = evo.state_dict()
    assert all(f"{m}.spawned" in evo_state for m in layers)
    evo_state[f"{layers[0]}.spawned"] = torch.tensor(True)
    evo.load_state_dict(evo_state, strict=True)
    assert moe_layers(evo)[0].is_spawned


def test_a_dense_checkpoint_upcycles_into_the_moe_model():
    """A stock transformer_lm's state dict loads into the EvoMoE LM of the same sizes: each MoE
    layer's experts all take that layer's dense FFN, the rest loads as is, so before the spawn the
    two models compute the same outputs; the gate and the EvoMoE state are the MoE model's own."""
    from fairseq.models import build_model

    sizes = ["--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "256",
             "--decoder-input-dim", "64", "--decoder-output-dim", "64", "--decoder-attention-heads", "2",
             "--activation-fn", "gelu", "--decoder-normalize-before"]
    moe, _, vocab = build_lm("--evomoe-diversify-updates", "5", "--max-update", "10", "--moe-gate", "dts", *sizes)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/nonexistent", "--task", "language_modeling", "--arch", "transformer_lm", *sizes])

    class Task:
        source_dictionary = target_dictionary = vocab

    torch.manual_seed(1)
    dense = build_model(args, Task()).eval()
    moe.set_num_updates(100)  # fairseq moves the model to the checkpoint's update count before loading
    moe.load_state_dict(dense.state_dict(), strict=True)
    assert int(moe_layers(moe)[0].gate.schedule_position) == 0  # the routing schedule starts afresh
    moe.eval()
    layer = moe_layers(moe)[0]
    assert not layer.is_spawned and int(layer.spawn_update) == 5
    torch.testing.assert_close(layer.experts.fc1_weight[3], dense.decoder.layers[1].fc1.weight)
    sample = lm_sample(vocab)
    with torch.no_grad():
        want = dense(**sample["net_input"])[0]
        got = moe(**sample["net_input"])[0]
    real = sample["net_input"]["src_tokens"] != vocab.pad()  # an MoE layer outputs 0 at padding
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)

    # stock transformer_lm without --decoder-normalize-before is post-norm (no final LayerNorm), while
    # the MoE LM architectures are pre-norm: refused, naming the option, not loaded into another network
    post = options.parse_args_and_arch(options.get_training_parser(), ["/nonexistent", "--task", "language_modeling", "--arch", "transformer_lm",
                                                *sizes[:-1]])
    post_norm = build_model(post, Task())
    assert post_norm.decoder.layer_norm is None
    with pytest.raises(ValueError, match="--decoder-normalize-before: the checkpoint's decoder has no final LayerNorm"):
        moe.load_state_dict(post_norm.state_dict(), strict=True)


def _dense_and_moe(task_name, dense_arch, moe_arch, sizes, vocab):
    """A stock fairseq model and our EvoMoE model of the same sizes, both built from the command
    line (the MoE one with its DTS gate, diversifying for 5 of 10 updates)."""
    from fairseq.models import build_model

    class Task:
        source_dictionary = target_dictionary = dictionary = vocab

        @staticmethod
        def max_positions():
            return 64

    def build(arch, *extra):
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, ["/nonexistent", "--task", task_name, "--arch", arch,
                                                    *sizes, *extra])
        return build_model(args, Task()).eval()

    torch.manual_seed(1)
    dense = build(dense_arch)
    torch.manual_seed(2)
    moe = build(moe_arch, "--moe-gate", "dts", "--evomoe-diversify-updates", "5", "--max-update", "10",
                "--moe-capacity-factor", "1.0")
    return dense, moe


@pytest.mark.parametrize("kind", ["translation", "roberta"])
def test_stock_translation_and_roberta_checkpoints_upcycle(kind):
    """Upcycling for the other two model families: a stock fairseq transformer (encoder and
    decoder FFNs) and a stock RoBERTa (its encoder sits one level deeper, under sentence_encoder)
    load into the EvoMoE model of the same sizes with strict=True, and before the spawn the MoE
    model computes the dense model's outputs on every real (non-padding) position."""
    vocab = Dictionary()
    for i in range(40):
        vocab.add_symbol(f"w{i}")
    if kind == "translation":
        sizes = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
                 "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
                 "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
        dense, moe = _dense_and_moe("translation", "transformer", "transformer_moe", sizes, vocab)
        stacks = [dense.encoder.layers, dense.decoder.layers]
    else:
        sizes = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                 "--encoder-attention-heads", "2", "--tokens-per-sample", "16"]
        vocab.add_symbol("<mask>")
        dense, moe = _dense_and_moe("masked_lm", "roberta", "roberta_moe", sizes, vocab)
        stacks = [dense.encoder.sentence_encoder.layers]
    with torch.no_grad():  # a trained dense model: its FFNs differ from any fresh initialisation
        for layers in stacks:
            for layer in layers:
                layer.fc1.weight.normal_(0, 0.2)
                layer.fc2.bias.normal_(0, 0.2)
    layers = moe_layers(moe)
    assert len(layers) == (2 if kind == "translation" else 1)  # every other FFN (moe_freq 2)
    sample = lm_sample(vocab)["net_input"]
    tokens, lengths = sample["src_tokens"], sample["src_lengths"]
    real = tokens != vocab.pad()
    prev = tokens.roll(1, 1).masked_fill(~real, vocab.pad())
    prev[:, 0] = vocab.eos()

    def outputs(model):
        with torch.no_grad():
            if kind == "translation":
                return model(tokens, lengths, prev)[0][real]
            return model(tokens)[0][real]

    moe.eval()
    before = outputs(moe)
    moe.set_num_updates(100)  # fairseq moves the model to the checkpoint's update count before loading
    moe.load_state_dict(dense.state_dict(), strict=True)
    for layer in layers:
        assert not layer.is_spawned and int(layer.gate.schedule_position) == 0
    dense_ffns = [layers_[1] for layers_ in stacks]  # the MoE FFN is the second layer of each stack
    for layer, ffn in zip(layers, dense_ffns):
        for e in range(layer.num_experts):
            torch.testing.assert_close(layer.experts.fc1_weight[e], ffn.fc1.weight)
            torch.testing.assert_close(layer.experts.fc2_bias[e], ffn.fc2.bias)

    want = outputs(dense)
    assert not torch.allclose(before, want, atol=1e-3)  # the MoE model's own weights compute something else
    torch.testing.assert_close(outputs(moe), want, rtol=1e-5, atol=1e-5)
