"""What every MoE criterion adds to its task loss, and the routing metrics it logs.

After the model's forward each MoELayer holds `metadata` (its balance loss, z-loss and routing
statistics). `MoELossMixin.add_moe_loss` reads them, adds

    moe_gate_loss_wt * sample_size * combine_over_layers(balance_loss)
  + moe_z_loss_wt    * sample_size * combine_over_layers(z_loss)
  +                    sample_size * combine_over_layers(extra_loss)   (a gate's own term, if any)

to the task loss while training (validation reports the pure task loss, so validation loss and
perplexity compare across gates), and puts the statistics into the logging output.

Losses:

  loss                 what is optimised: task loss + MoE loss (per sample_size, as fairseq logs it)
  inner_loss           the task loss alone (per sample_size)
  moe_gate_loss        the weighted balance (+ z) loss term
  moe_extra_loss       a gate's own loss term, where it has one (StableMoE's stage-1 routing
                       distillation, weighted by --stablemoe-distill-wt)
  nll_loss, ppl        of the task loss alone, per predicted token (never includes the MoE loss);
                       nll_loss appears where fairseq logs it (--sentence-avg, translation)

Routing metrics are computed on the training updates fairseq writes a log line after (the MoE
criteria read --log-interval and set the layers' `collect_stats` for those updates' forwards) and
in validation, never between log lines or at generation. A logging output of such a forward
carries sums per MoE layer (python floats that add up across micro-batches, workers and validation
batches; their keys start with "_" and are never shown). A logged value is computed per layer from
those sums over everything the line covers (the micro-batches and workers of the logged update,
or the whole validation set), then averaged over the MoE layers; a 4-token batch weighs 4 tokens. The load statistics (busiest,
idlest, unused) are those of each forward, the load its capacity acted on, as a token-weighted
mean. "Assignment" = one (token, expert) pair chosen by the gate; a token sent to 2 experts makes 2.

  moe_experts_per_token       routed assignments per token, BEFORE capacity
  moe_kept_experts_per_token  assignments per token AFTER capacity (kept ones)
  moe_dropped_pct             % of routed ASSIGNMENTS dropped by capacity
  moe_tokens_dropped_pct      % of TOKENS that kept no expert (their FFN output is 0)
  moe_busiest_load / moe_idlest_load  kept tokens of the busiest / idlest expert over the mean
                              (1 = balanced), per forward
  moe_unused_experts          experts that kept no token in a forward
  moe_router_entropy          mean entropy of the router distribution per token (nats)
  moe_<count>_pct             % of tokens in a count the gate reports (Routing.token_counts), e.g. the
                              DTS gate's moe_switch_changed_pct
  moe_router_logit_std        mean over tokens of the std of the router logits over experts (nats)
  moe_router_top_gap          mean over tokens of the gap between the two largest router logits (nats)
  moe_hard_eval_agree_pct     DTS gate, hard phase: % of tokens whose training expert is argmax(l), the
                              one evaluation routes them to
  moe_expert_compute          expert compute spent by training so far, cumulative over the run: kept
                              (token, expert) assignments summed over the MoE layers, i.e. expert FFN
                              passes of one token (a dense FFN layer would count one per token); in
                              fairseq's saved metrics, so it continues on resume (not with --reset-meters)
  moe_<gate state>            gate schedule values, e.g. moe_temperature, moe_phase (mean of the outputs)
  moe_load_<layer>_e<k>       share of kept tokens of expert k in that layer, over the forwards
                              the gate routed only (EvoMoE: after the spawn) (with --moe-log-expert-load)
"""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import Tensor
from fairseq.dataclass import FairseqDataclass
from omegaconf import II
from fairseq import metrics, utils

from ..moe.layer import MoELayer, moe_layers
from ..option_values import require_finite

COMBINE_METHODS = ("sum", "average")

# --moe-soft-gate-loss-wt's default: no balance loss while a DTS gate routes softly (docs/evomoe_diagnosis.md)
SOFT_GATE_LOSS_WT = 0.0


@dataclass
class MoELossOptions(FairseqDataclass):
    moe_gate_loss_wt: float = field(
        default=0.01, metadata={"help": "weight of the balance loss (x sample size); the paper used 0.01 for GPT, 0 for translation"}
    )
    moe_gate_loss_combine_method: str = field(
        default="average", metadata={"help": "how layers' balance losses combine: sum or average"}
    )
    moe_z_loss_wt: float = field(default=0.0, metadata={"help": "weight of the router z-loss (x sample size); 0 = off"})
    moe_log_expert_load: bool = field(
        default=False, metadata={"help": "also log each expert's share of tokens per layer (for load heatmaps)"}
    )
    moe_soft_gate_loss_wt: float = field(
        default=SOFT_GATE_LOSS_WT,
        metadata={"help": "weight of the balance loss of MoE layers whose DTS gate is in its soft (dense-to-sparse) phase "
                  "(default 0: none there); -1 = --moe-gate-loss-wt (the hard phase and every other gate always use "
                  "--moe-gate-loss-wt)"},
    )
    # fairseq writes a training log line after every log_interval-th update: the statistics only
    # wanted on such steps are computed then (and for validation)
    log_interval: int = II("common.log_interval")


class MoELossMixin:
    def init_moe_loss(self, moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load,
                      moe_soft_gate_loss_wt=SOFT_GATE_LOSS_WT, log_interval=0):
        if moe_gate_loss_combine_method not in COMBINE_METHODS:
            raise ValueError(
                f"--moe-gate-loss-combine-method {moe_gate_loss_combine_method!r} is not valid; choose one of: {', '.join(COMBINE_METHODS)}"
            )
        require_finite({"--moe-gate-loss-wt": moe_gate_loss_wt, "--moe-z-loss-wt": moe_z_loss_wt,
                        "--moe-soft-gate-loss-wt": moe_soft_gate_loss_wt})
        if moe_gate_loss_wt < 0 or moe_z_loss_wt < 0:
            raise ValueError("--moe-gate-loss-wt and --moe-z-loss-wt must be >= 0")
        if moe_soft_gate_loss_wt < 0 and moe_soft_gate_loss_wt != -1:
            raise ValueError(f"--moe-soft-gate-loss-wt must be >= 0, or -1 for --moe-gate-loss-wt; got {moe_soft_gate_loss_wt}")
        self.moe_gate_loss_wt = moe_gate_loss_wt
        self.moe_soft_gate_loss_wt = moe_gate_loss_wt if moe_soft_gate_loss_wt == -1 else moe_soft_gate_loss_wt
        self.moe_gate_loss_combine_method = moe_gate_loss_combine_method
        self.moe_z_loss_wt = moe_z_loss_wt
        self.moe_log_expert_load = moe_log_expert_load
        self.log_interval = log_interval if isinstance(log_interval, int) else 0

    def init_moe_loss_from_cfg(self, cfg):
        """init_moe_loss for criteria that take their whole config (a MoELossOptions subclass)."""
        self.init_moe_loss(cfg.moe_gate_loss_wt, cfg.moe_gate_loss_combine_method, cfg.moe_z_loss_wt,
                           cfg.moe_log_expert_load, cfg.moe_soft_gate_loss_wt, cfg.log_interval)

    def forward(self, model, sample, reduce=True):
        """The task criterion's forward (next in the MRO), plus the MoE loss. Validation forwards
        and the training forwards of a logged update also collect the statistics wanted only then."""
        layers = moe_layers(model)
        for m in layers:
            m.collect_stats = not model.training or self.logs_after_this_update(m.num_updates)
        try:
            loss, sample_size, logging_output = super().forward(model, sample, reduce)
        finally:
            for m in layers:
                m.collect_stats = False
        return self.add_moe_loss(model, loss, sample_size, logging_output, layers)

    def logs_after_this_update(self, num_updates: int) -> bool:
        """Whether fairseq-train writes a log line after the update that follows `num_updates`
        (every update when the log interval is unknown, e.g. outside fairseq-train)."""
        return self.log_interval <= 0 or (num_updates + 1) % self.log_interval == 0

    def balance_weights(self, layers: List[MoELayer]) -> Optional[Tensor]:
        """Per-layer balance-loss weights where --moe-soft-gate-loss-wt makes them differ (layers in
        the DTS gate's soft phase); None where every layer has --moe-gate-loss-wt."""
        if self.moe_soft_gate_loss_wt == self.moe_gate_loss_wt:
            return None
        soft = [m.routes_dense_to_sparse() for m in layers]
        if not any(soft):
            return None
        return torch.tensor([self.moe_soft_gate_loss_wt if s else self.moe_gate_loss_wt for s in soft])

    def add_moe_loss(self, model, loss, sample_size, logging_output, layers: Optional[List[MoELayer]] = None):
        """The task loss plus the MoE loss of the model's MoE layers (`layers`: those, found once by
        the caller; None: looked up here), and the logging output."""
        layers = [m for m in (moe_layers(model) if layers is None else layers) if m.metadata]
        logging_output["inner_loss"] = loss.data
        gate_term = loss.new_zeros(())
        if layers and model.training:
            balance = torch.stack([m.metadata["balance_loss"] for m in layers])
            z = torch.stack([m.metadata["z_loss"] for m in layers])
            reduce = torch.sum if self.moe_gate_loss_combine_method == "sum" else torch.mean
            weights = self.balance_weights(layers)
            if weights is None:
                balance_term = self.moe_gate_loss_wt * reduce(balance)
            else:
                balance_term = reduce(weights.to(balance) * balance)
            gate_term = sample_size * (balance_term + self.moe_z_loss_wt * reduce(z))
            logging_output["moe_gate_loss"] = gate_term.data.to(loss.dtype)
            extra = [m.metadata["extra_loss"] for m in layers if "extra_loss" in m.metadata]
            if extra:  # e.g. StableMoE's routing distillation, weighted by the gate itself
                extra_term = sample_size * reduce(torch.stack(extra))
                logging_output["moe_extra_loss"] = extra_term.data.to(loss.dtype)
                gate_term = gate_term + extra_term
            gate_term = gate_term.to(loss.dtype)
            loss = loss + gate_term
        else:
            logging_output["moe_gate_loss"] = gate_term.data
        logging_output["loss"] = loss.data
        if layers and model.training:  # expert compute spent by training (validation's is not counted)
            logging_output[TRAINING_KEPT] = sum(m.metadata["kept_assignments"] for m in layers)
        reporting = [m for m in layers if "num_tokens" in m.metadata]  # the layers that collected statistics
        if reporting:
            logging_output.update(routing_summary(reporting, self.moe_log_expert_load))
        return loss, sample_size, logging_output


# Per MoE layer and forward, the logging output carries these sums (python floats, key
# _moe_<count>_<layer>); a logged ratio divides two of them summed over the log line's forwards.
# busiest / idlest / unused are computed per forward (the load a forward's capacity acts on) and
# carried times the tokens, so their logged value is a token-weighted mean over forwards.
COUNTS = ("tokens", "routed", "kept", "unserved", "entropy", "busiest", "idlest", "unused")
ROUTING_METRICS = {  # logged name -> (numerator, denominator, scale)
    "moe_experts_per_token": ("routed", "tokens", 1.0),
    "moe_kept_experts_per_token": ("kept", "tokens", 1.0),
    "moe_dropped_pct": ("dropped", "routed", 100.0),
    "moe_tokens_dropped_pct": ("unserved", "tokens", 100.0),
    "moe_busiest_load": ("busiest", "tokens", 1.0),
    "moe_idlest_load": ("idlest", "tokens", 1.0),
    "moe_unused_experts": ("unused", "tokens", 1.0),
    "moe_router_entropy": ("entropy", "tokens", 1.0),
}


def layer_names(layers: List[MoELayer]) -> List[str]:
    names = []
    for i, m in enumerate(layers):
        name = m.layer_name or f"moe{i}"
        names.append(name if name not in names else f"{name}_{i}")  # two layers never share counts
    return names


def routing_summary(layers: List[MoELayer], per_expert: bool) -> Dict[str, float]:
    """The layers' routing counts of this forward (see COUNTS; one host sync for all of them), with
    per_expert each expert's kept tokens (_moe_load_<layer>_e<k>, forwards the gate routed only), the gate
    state and moe_count = 1."""
    device = layers[0].metadata["tokens_per_expert"].device
    rows, loads = [], []
    for m in layers:
        md = m.metadata
        load = md["tokens_per_expert"].detach().float().to(device)
        n = torch.as_tensor(md["num_tokens"], dtype=torch.float, device=device).reshape(())
        mean = load.mean().clamp(min=1e-9)
        rows.append(torch.stack([
            n,
            md["routed_per_expert"].float().to(device).sum(),
            load.sum(),
            torch.as_tensor(md["tokens_unserved"], dtype=torch.float, device=device).reshape(()),
            torch.as_tensor(md["router_entropy"], dtype=torch.float, device=device).reshape(()) * n,
            load.max() / mean * n,
            load.min() / mean * n,
            (load == 0).sum().float() * n,
        ]))
        loads.append(load if per_expert and m.gate_routes else load[:0])
    names = layer_names(layers)
    gate_counts = [(f"{TOKEN_COUNT}{key[len('token_count_'):]}_{name}", value.to(device).reshape(1))
                   for m, name in zip(layers, names) for key, value in m.metadata.items() if key.startswith("token_count_")]
    sampled = [(f"{STAT}{key[len('stat_'):]}_{name}", f"{STAT_COUNT}{key[len('stat_'):]}_{name}", value.to(device).reshape(2))
               for m, name in zip(layers, names) for key, value in m.metadata.items() if key.startswith("stat_")]
    values = torch.cat([torch.stack(rows).flatten()] + loads + [v for _, v in gate_counts] + [v for _, _, v in sampled]).tolist()
    keys = [f"_moe_{c}_{name}" for name in names for c in COUNTS]
    keys += [f"_moe_load_{name}_e{e}" for name, load in zip(names, loads) for e in range(load.numel())]
    keys += [k for k, _ in gate_counts]
    keys += [k for total, count, _ in sampled for k in (total, count)]
    out: Dict[str, float] = dict(zip(keys, values))
    state = layers[0].state_for_logging()
    for k, v in state.items():
        out[f"moe_{k}"] = float(v)
    # the layer's phase (EvoMoE: 0 expert-diversify, then the DTS gate's 1 soft, 2 hard), else 1
    out["moe_phase"] = float(state.get("phase", 1))
    out["moe_count"] = 1
    return out


TOKEN_COUNT = "_moe_tokencount_"  # + <count>_<layer>: a count of tokens the gate reports
STAT = "_moe_stat_"  # + <name>_<layer>: the sum of a sampled statistic (MoELayer.collect_stats)
STAT_COUNT = "_moe_statn_"  # + <name>_<layer>: what that sum is over (tokens)
EXPERT_COMPUTE = "_moe_expert_compute"
TRAINING_KEPT = "_moe_training_kept"  # a training forward's kept assignments, all layers


def _expert_compute_spent(meters) -> float:
    meter = metrics.get_meter(EXPERT_COMPUTE, EXPERT_COMPUTE)
    return round(float(meter.sum), 0) if meter is not None else 0.0


def _total(logging_outputs, key):
    return sum(log.get(key, 0) for log in logging_outputs)


def _summed(meters, key: str) -> float:
    return float(meters[key].sum) if key in meters else 0.0


def _layer_ratio(meters, name: str, layer: str) -> float:
    num, den, scale = ROUTING_METRICS[name]
    get = lambda c: _summed(meters, f"_moe_{c}_{layer}")  # noqa: E731
    numerator = get("routed") - get("kept") if num == "dropped" else get(num)
    return scale * numerator / get(den) if get(den) > 0 else 0.0


def _mean_over_layers(name: str, layers: List[str], meters) -> float:
    return round(sum(_layer_ratio(meters, name, layer) for layer in layers) / len(layers), 3)


def _token_count_pct(count: str, layers: List[str], meters) -> float:
    """The mean, over the layers that report `count`, of its share of their tokens (in %)."""
    shares = [100 * _summed(meters, f"{TOKEN_COUNT}{count}_{layer}") / _summed(meters, f"_moe_tokens_{layer}")
              for layer in layers if f"{TOKEN_COUNT}{count}_{layer}" in meters and _summed(meters, f"_moe_tokens_{layer}") > 0]
    return round(sum(shares) / len(shares), 3) if shares else 0.0


def _sampled_mean(name: str, layers: List[str], meters) -> float:
    """The mean, over the layers that report statistic `name`, of its sum over its count."""
    means = [_summed(meters, f"{STAT}{name}_{layer}") / _summed(meters, f"{STAT_COUNT}{name}_{layer}")
             for layer in layers if _summed(meters, f"{STAT_COUNT}{name}_{layer}") > 0]
    return round(sum(means) / len(means), 3) if means else 0.0


def _layer_suffixed(prefix: str, keys: List[str], layers: List[str]) -> List[str]:
    """The names <name> of the keys <prefix><name>_<layer>, for the given layers."""
    return sorted({k[len(prefix):].rsplit(f"_{layer}", 1)[0] for k in keys if k.startswith(prefix)
                   for layer in layers if k.endswith(f"_{layer}")})


def _expert_share(layer: str, expert: int, num_experts: int, meters) -> float:
    loads = [_summed(meters, f"_moe_load_{layer}_e{e}") for e in range(num_experts)]
    return round(loads[expert] / sum(loads), 3) if sum(loads) > 0 else 0.0


def reduce_moe_metrics(logging_outputs) -> None:
    """Log the MoE keys; call before the task criterion's reduce_metrics.

    The counts go into hidden sum meters ("_moe_...", which fairseq never shows) and the routing
    metrics are derived from those sums when a log line is written. This works on the micro-batches'
    logging outputs, on outputs fairseq already summed key-wise across workers, and with one call
    per validation batch."""
    sample_size = _total(logging_outputs, "sample_size")
    inner = _total(logging_outputs, "inner_loss")
    gate = _total(logging_outputs, "moe_gate_loss")
    if sample_size > 0:
        metrics.log_scalar("inner_loss", inner / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("moe_gate_loss", gate / sample_size / math.log(2), sample_size, round=4)
        if any("moe_extra_loss" in log for log in logging_outputs):
            extra = _total(logging_outputs, "moe_extra_loss")
            metrics.log_scalar("moe_extra_loss", extra / sample_size / math.log(2), sample_size, round=4)
    # training's kept assignments accumulate in an aggregator of their own, which fairseq never
    # resets and saves in checkpoints with its other metrics; between log lines they are a device
    # tensor, added without reading it on the host
    with metrics.aggregate(EXPERT_COMPUTE):
        metrics.log_scalar_sum(EXPERT_COMPUTE, _total(logging_outputs, TRAINING_KEPT))
    count = float(_total(logging_outputs, "moe_count"))
    if count == 0:  # no layer collected statistics (an update fairseq does not log)
        return
    keys = sorted({k for log in logging_outputs for k in log if k.startswith(("_moe_", "moe_"))})
    layers, experts = [], {}
    for k in keys:
        if k == TRAINING_KEPT:
            continue
        if k.startswith("_moe_"):
            metrics.log_scalar_sum(k, float(_total(logging_outputs, k)))
            if k.startswith("_moe_tokens_"):
                layers.append(k[len("_moe_tokens_"):])
            elif k.startswith("_moe_load_"):
                layer, e = k[len("_moe_load_"):].rsplit("_e", 1)
                experts[layer] = max(experts.get(layer, 0), int(e) + 1)
        elif k not in ("moe_count", "moe_gate_loss", "moe_extra_loss"):  # gate state: the mean over the outputs
            metrics.log_scalar(k, float(_total(logging_outputs, k)) / count, count, round=3)
    for name in ROUTING_METRICS:
        metrics.log_derived(name, partial(_mean_over_layers, name, layers), priority=10)
    for count in _layer_suffixed(TOKEN_COUNT, keys, layers):
        metrics.log_derived(f"moe_{count}_pct", partial(_token_count_pct, count, layers), priority=10)
    for name in _layer_suffixed(STAT, keys, layers):
        metrics.log_derived(f"moe_{name}", partial(_sampled_mean, name, layers), priority=10)
    metrics.log_derived("moe_expert_compute", _expert_compute_spent, priority=10)
    for layer, num_experts in sorted(experts.items()):
        for e in range(num_experts):
            metrics.log_derived(f"moe_load_{layer}_e{e}", partial(_expert_share, layer, e, num_experts), priority=10)


def reduce_task_nll_loss(logging_outputs, tokens_key: str = "ntokens") -> bool:
    """Logs `nll_loss`, the task loss alone (`inner_loss`) per predicted token (`tokens_key`), where
    fairseq's criteria log an nll_loss: when sample_size is not the token count. Whether it did."""
    ntokens = _total(logging_outputs, tokens_key)
    if _total(logging_outputs, "sample_size") == ntokens:
        return False
    metrics.log_scalar("nll_loss", _total(logging_outputs, "inner_loss") / ntokens / math.log(2), ntokens, round=3)
    return True


def reduce_loss_and_ppl(logging_outputs, tokens_key: str = "ntokens") -> None:
    """`loss` (task + MoE loss per sample_size, what is optimised) as fairseq's criteria log it, and
    the perplexity of the task loss alone (`inner_loss`) per predicted token: `tokens_key` names the
    logging-output count of those tokens ("ntokens" for language modelling, "sample_size" for the
    masked LM, whose sample_size is its masked tokens). Like fairseq, `nll_loss` (task loss per
    token) is logged only where sample_size is not the token count (--sentence-avg).
    Call after reduce_moe_metrics, which logs inner_loss."""
    loss_sum = _total(logging_outputs, "loss")
    sample_size = _total(logging_outputs, "sample_size")
    metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
    if reduce_task_nll_loss(logging_outputs, tokens_key):
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
    else:
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["inner_loss"].avg))
