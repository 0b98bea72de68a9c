"""The MoE criteria's logged metrics: routing metrics weighted by the tokens of every forward a log
line covers (micro-batches of an update, workers, validation batches), also when fairseq sums the
logging outputs across workers first; raw counts never shown; perplexity of the task loss alone."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import metrics, utils

from fairseq_evomoe.criterions.moe_criterions import (
    MoECrossEntropyCriterion,
    MoELabelSmoothedCrossEntropyCriterion,
    MoEMaskedLmConfig,
    MoEMaskedLmLoss,
)
from fairseq_evomoe.criterions.moe_loss import MoELossMixin, reduce_moe_metrics

from moe_helpers import PAD, make_layer

E = 8
ROUTING_KEYS = {
    "moe_experts_per_token", "moe_kept_experts_per_token", "moe_dropped_pct", "moe_tokens_dropped_pct",
    "moe_busiest_load", "moe_idlest_load", "moe_unused_experts", "moe_router_entropy",
}


class Collector(MoELossMixin):
    """The MoE part of a criterion, on its own."""

    def __init__(self, per_expert=False):
        self.init_moe_loss(0.01, "average", 0.0, per_expert)


def two_layers():
    """Two MoE layers that drop under capacity: top-2 (drops assignments, sometimes whole tokens)
    and top-1 (every dropped assignment is a dropped token)."""
    model = nn.ModuleList([
        make_layer("top2", num_experts=E, capacity_factor=0.5, seed=0),
        make_layer("top1", num_experts=E, capacity_factor=0.75, seed=1),
    ])
    model[0].layer_name, model[1].layer_name = "enc0", "dec0"
    return model.train()


def run_batches(model, sizes, per_expert=False, seed=0):
    """One logging output per batch, and the layers' metadata of each batch."""
    crit, logs, mds = Collector(per_expert), [], []
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        x = torch.randn(n, 16, generator=g)
        torch.manual_seed(seed + n)
        h = x
        for layer in model:
            h = h + layer(h)
        loss = h.pow(2).sum()
        _, _, log = crit.add_moe_loss(model, loss, n, {"sample_size": n, "ntokens": n})
        logs.append(log)
        mds.append([{k: v.detach().clone() for k, v in layer.metadata.items()} for layer in model])
    return logs, mds


def pooled_reference(mds):
    """The routing metrics of the pooled counts, straight from the layers' metadata: per layer the
    sums over batches, ratios of the sums, then the mean over layers."""
    per_layer = []
    for i in range(len(mds[0])):
        md = [batch[i] for batch in mds]
        tokens = sum(float(m["num_tokens"]) for m in md)
        routed = sum(float(m["routed_per_expert"].sum()) for m in md)
        kept = sum(float(m["tokens_per_expert"].sum()) for m in md)
        unserved = sum(float(m["tokens_unserved"]) for m in md)
        entropy = sum(float(m["router_entropy"]) * float(m["num_tokens"]) for m in md)

        def per_forward(stat):  # a load statistic of each forward, weighted by its tokens
            return sum(stat(m["tokens_per_expert"].double()) * float(m["num_tokens"]) for m in md) / tokens
        per_layer.append({
            "moe_experts_per_token": routed / tokens,
            "moe_kept_experts_per_token": kept / tokens,
            "moe_dropped_pct": 100 * (routed - kept) / routed,
            "moe_tokens_dropped_pct": 100 * unserved / tokens,
            "moe_busiest_load": per_forward(lambda load: float(load.max() / load.mean())),
            "moe_idlest_load": per_forward(lambda load: float(load.min() / load.mean())),
            "moe_unused_experts": per_forward(lambda load: float((load == 0).sum())),
            "moe_router_entropy": entropy / tokens,
        })
    return {k: sum(p[k] for p in per_layer) / len(per_layer) for k in ROUTING_KEYS}


def reduce(logs, crit_reduce=reduce_moe_metrics, calls=None):
    """What fairseq shows for these logging outputs: one reduce_metrics call with all of them, or
    (calls="each") one call per output in the same aggregator, as in validation."""
    with metrics.aggregate(new_root=True) as agg:
        for batch in ([[log] for log in logs] if calls == "each" else [logs]):
            crit_reduce(batch)
        return agg.get_smoothed_values()


def summed(logs):
    """The logging outputs as fairseq's fast stat sync leaves them: one dict, each key of the first
    output summed over all of them, as a float64 tensor."""
    return [{k: torch.tensor(float(sum(log[k] for log in logs if k in log)), dtype=torch.double) for k in logs[0]}]


def assert_metrics(got, expected):
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1.5e-3), k


@pytest.fixture(scope="module")
def uneven():
    """A 2,048-token batch and a 5-token batch of the same update."""
    model = two_layers()
    return run_batches(model, (2048, 5))


def test_the_small_batch_would_skew_a_per_batch_average(uneven):
    """The setting is a real test: the 5-token batch leaves experts unused and drops at another
    rate than the big one, so a plain mean over batches would differ from the token-weighted one."""
    logs, mds = uneven
    small, big = reduce(logs[1:]), reduce(logs[:1])
    pooled = pooled_reference(mds)
    assert small["moe_unused_experts"] >= 3 and big["moe_unused_experts"] == 0
    assert pooled["moe_tokens_dropped_pct"] > 0
    assert abs(small["moe_dropped_pct"] - big["moe_dropped_pct"]) > 1
    for k in ("moe_unused_experts", "moe_busiest_load", "moe_idlest_load", "moe_dropped_pct"):
        per_batch_mean = (small[k] + big[k]) / 2
        assert abs(per_batch_mean - pooled[k]) > 0.01, k


def test_uneven_batches_reduce_to_the_pooled_counts(uneven):
    logs, mds = uneven
    got = reduce(logs)
    assert_metrics(got, pooled_reference(mds))
    # the raw counts are not log columns
    assert not [k for k in got if k.startswith("_")]
    assert set(got) == ROUTING_KEYS | {"inner_loss", "moe_gate_loss", "moe_phase", "moe_expert_compute",
                                     "moe_router_logit_std", "moe_router_top_gap"}


def test_logging_outputs_summed_across_workers_reduce_the_same(uneven):
    logs, mds = uneven
    assert_metrics(reduce(summed(logs)), pooled_reference(mds))


def test_one_reduce_per_batch_pools_too(uneven):
    """Validation reduces each batch on its own into one aggregator: still the pooled counts."""
    logs, mds = uneven
    assert_metrics(reduce(logs, calls="each"), pooled_reference(mds))


def test_expert_load_shares_are_pooled_and_sparse_only():
    model = two_layers()
    logs, mds = run_batches(model, (600, 7), per_expert=True, seed=3)
    for sync in (lambda l: l, summed):
        got = reduce(sync(logs))
        for i, name in enumerate(("enc0", "dec0")):
            load = sum(batch[i]["tokens_per_expert"].double() for batch in mds)
            for e in range(E):
                assert got[f"moe_load_{name}_e{e}"] == pytest.approx(float(load[e] / load.sum()), abs=1.5e-3)
    # the dense (expert-diversify) phase: one expert takes every token; no share keys
    model = nn.ModuleList([make_layer("top2", num_experts=E, seed=0, diversify=True),
                           make_layer("top1", num_experts=E, seed=1, diversify=True)]).train()
    model[0].layer_name, model[1].layer_name = "enc0", "dec0"
    dense_logs, _ = run_batches(model, (64, 3), per_expert=True)
    got = reduce(dense_logs)
    assert not [k for k in got if k.startswith("moe_load_")]
    assert got["moe_phase"] == 0 and got["moe_experts_per_token"] == 1.0 and got["moe_kept_experts_per_token"] == 1.0
    assert got["moe_unused_experts"] == E - 1 and got["moe_dropped_pct"] == 0 and got["moe_tokens_dropped_pct"] == 0


# ------------------------------------------------------------------------------------- perplexity

VOCAB = 24


class TinyLM(nn.Module):
    """Embedding -> MoE FFN (residual) -> vocabulary, with the model API fairseq's criteria use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.moe = make_layer("top2", num_experts=4, capacity_factor=1.0, seed=0)
        self.moe.layer_name = "dec0"
        self.out = nn.Linear(16, VOCAB)

    def forward(self, src_tokens, src_lengths=None, masked_tokens=None):
        x = self.embed(src_tokens).transpose(0, 1)  # [T, B, M]
        h = (x + self.moe(x, src_tokens)).transpose(0, 1)
        logits = self.out(h)
        if masked_tokens is not None:
            logits = logits[masked_tokens]
        return logits, {}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0].float(), -1) if log_probs else F.softmax(net_output[0].float(), -1)

    def get_targets(self, sample, net_output):
        return sample["target"]


TASK = SimpleNamespace(target_dictionary=SimpleNamespace(pad=lambda: PAD))


def lm_sample(bsz, T, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (bsz, T), generator=g)
    src[0, T - T // 3:] = PAD  # some padding
    target = torch.randint(2, VOCAB, (bsz, T), generator=g).masked_fill(src.eq(PAD), PAD)
    if masked:  # predict ~30% of the tokens
        target = target.masked_fill(torch.rand(bsz, T, generator=g) > 0.3, PAD)
    return {"net_input": {"src_tokens": src, "src_lengths": src.ne(PAD).sum(1)}, "target": target,
            "ntokens": int(src.ne(PAD).sum()), "nsentences": bsz}


CRITERIA = {
    "cross_entropy_sentence_avg": lambda: MoECrossEntropyCriterion(TASK, True, 1.0, "average", 0.1, False),
    "cross_entropy": lambda: MoECrossEntropyCriterion(TASK, False, 1.0, "average", 0.1, False),
    "masked_lm": lambda: MoEMaskedLmLoss(MoEMaskedLmConfig(tpu=False, moe_gate_loss_wt=1.0, moe_z_loss_wt=0.1), TASK),
    "label_smoothed_sentence_avg": lambda: MoELabelSmoothedCrossEntropyCriterion(TASK, True, 0.1, 1.0, "average", 0.1, False),
}


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_ppl_is_of_the_task_loss_per_token(name):
    crit = CRITERIA[name]()
    model = TinyLM().train()
    logs = [crit(model, lm_sample(bsz, T, seed=bsz, masked=name == "masked_lm"))[2] for bsz, T in ((6, 12), (2, 5))]
    assert all(float(log["moe_gate_loss"]) > 0.05 for log in logs)  # a real MoE loss is in `loss`
    got = reduce(logs, type(crit).reduce_metrics)

    if name.startswith("label_smoothed"):  # fairseq's own nll_loss: the task loss without smoothing
        task_sum, tokens = sum(float(log["nll_loss"]) for log in logs), sum(log["ntokens"] for log in logs)
    else:
        task_sum = sum(float(log["inner_loss"]) for log in logs)
        tokens = sum(int(log["sample_size" if name == "masked_lm" else "ntokens"]) for log in logs)
    per_token = task_sum / tokens / math.log(2)
    assert got["ppl"] == pytest.approx(utils.get_perplexity(per_token), abs=0.011)
    with_moe = sum(float(log["loss"]) for log in logs) / tokens / math.log(2)
    assert abs(got["ppl"] - 2 ** with_moe) > 0.5  # the MoE loss would show

    sample_size = sum(float(log["sample_size"]) for log in logs)
    assert got["loss"] == pytest.approx(sum(float(log["loss"]) for log in logs) / sample_size / math.log(2), abs=1e-3)
    assert got["inner_loss"] == pytest.approx(sum(float(log["inner_loss"]) for log in logs) / sample_size / math.log(2), abs=1e-3)
    if name.endswith("sentence_avg"):  # fairseq logs nll_loss (per token) here
        assert got["nll_loss"] == pytest.approx(per_token, abs=1e-3)
    elif name in ("cross_entropy", "masked_lm"):
        assert "nll_loss" not in got

    # the same after fairseq sums the logging outputs across workers
    assert reduce(summed(logs), type(crit).reduce_metrics)["ppl"] == pytest.approx(got["ppl"], abs=1e-6)


def test_sentence_prediction_logs_its_nll_loss_of_the_task_loss_alone():
    """sentence_prediction logs loss (per sentence, what is optimised: task + MoE loss), accuracy
    and a per-token nll_loss; the MoE criterion's nll_loss leaves the MoE loss out, as every other
    MoE criterion's does."""
    from fairseq_evomoe.criterions.moe_criterions import MoESentencePredictionCriterion

    logs = [{"loss": 9.0, "inner_loss": 6.0, "moe_gate_loss": 3.0, "ntokens": 40, "nsentences": 4, "sample_size": 4,
             "ncorrect": 3},
            {"loss": 5.0, "inner_loss": 4.0, "moe_gate_loss": 1.0, "ntokens": 20, "nsentences": 2, "sample_size": 2,
             "ncorrect": 1}]
    got = reduce(logs, MoESentencePredictionCriterion.reduce_metrics)
    assert got["loss"] == pytest.approx(14.0 / 6 / math.log(2), abs=1e-3)
    assert got["inner_loss"] == pytest.approx(10.0 / 6 / math.log(2), abs=1e-3)
    assert got["nll_loss"] == pytest.approx(10.0 / 60 / math.log(2), abs=1e-3)
    assert got["accuracy"] == pytest.approx(100 * 4 / 6, abs=0.1)


# ------------------------------------------------------------------------------ expert compute


def test_expert_compute_accumulates_over_training_only_and_survives_a_resume():
    """moe_expert_compute: the kept (token, expert) assignments of every training forward so far,
    summed over layers (two layers that drop under capacity: kept, not routed); validation (the
    model in eval mode, reduced in a new root aggregator as fairseq's validate does) adds nothing;
    fairseq's saved metrics carry it over a resume."""
    metrics.reset()
    try:
        model = two_layers()
        first, mds1 = run_batches(model, (50, 30), seed=1)
        second, mds2 = run_batches(model, (40,), seed=2)
        kept = [sum(float(layer["tokens_per_expert"].sum()) for layer in batch) for batch in mds1 + mds2]
        routed = sum(float(layer["routed_per_expert"].sum()) for batch in mds1 + mds2 for layer in batch)
        assert sum(kept) < routed  # capacity dropped some: compute counts what ran
        seen = []
        for logs in (first, second):
            with metrics.aggregate("train_inner") as agg:
                reduce_moe_metrics(logs)
                seen.append(agg.get_smoothed_values()["moe_expert_compute"])
        assert seen == [round(sum(kept[:2])), round(sum(kept))]
        model.eval()
        valid, _ = run_batches(model, (40,), seed=2)
        model.train()
        with metrics.aggregate(new_root=True) as agg:  # validation
            reduce_moe_metrics(valid)
            assert agg.get_smoothed_values()["moe_expert_compute"] == round(sum(kept))
        state = metrics.state_dict()  # what a checkpoint keeps; fairseq restores it on resume
        metrics.reset()
        metrics.load_state_dict(state)
        with metrics.aggregate("train_inner") as agg:
            reduce_moe_metrics(second)
            assert agg.get_smoothed_values()["moe_expert_compute"] == round(sum(kept) + kept[2])
    finally:
        metrics.reset()


def test_gate_token_counts_are_logged_as_a_share_of_tokens():
    """A count of tokens a gate reports (Routing.token_counts, e.g. the DTS gate's switch_changed)
    is logged as moe_<name>_pct: per layer its share of the layer's tokens, over every batch the
    line covers, then the mean over the layers that report it."""
    model = nn.ModuleList([make_layer("dts", num_experts=E, seed=0, dts_anneal_updates=10, dts_hard_update=10,
                                      evomoe_diversify_updates=0, dts_hard_routing="sample"),
                           make_layer("top1", num_experts=E, seed=1)]).train()
    model[0].layer_name, model[1].layer_name = "enc0", "dec0"
    model[0].gate.set_num_updates(10)
    logs, mds = run_batches(model, (60, 25))
    changed = sum(float(batch[0]["token_count_switch_changed"]) for batch in mds)
    tokens = sum(float(batch[0]["num_tokens"]) for batch in mds)
    assert 0 < changed < tokens and "token_count_switch_changed" not in mds[0][1]
    for sync in (lambda l: l, summed):
        assert reduce(sync(logs))["moe_switch_changed_pct"] == pytest.approx(100 * changed / tokens, abs=1e-3)
