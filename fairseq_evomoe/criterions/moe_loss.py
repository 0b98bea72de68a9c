"""What every MoE criterion adds to its task loss, and the routing metrics it logs.

After the model's forward each MoELayer holds `metadata` (its balance loss, z-loss and routing
statistics). `MoELossMixin.add_moe_loss` reads them, adds

    moe_gate_loss_wt * sample_size * combine_over_layers(balance_loss)
  + moe_z_loss_wt    * sample_size * combine_over_layers(z_loss)

to the task loss while training (validation reports the pure task loss, so validation loss and
perplexity compare across gates), and puts the statistics into the logging output. Logged keys:

  inner_loss           the task loss alone
  moe_gate_loss        the weighted balance (+ z) loss term
  moe_experts_per_token  mean routed experts per token (mean over MoE layers)
  moe_dropped_pct      % of assignments dropped by capacity
  moe_busiest_load / moe_idlest_load  tokens of the busiest / idlest expert over the mean (1 = balanced)
  moe_unused_experts   experts that got no token (mean over layers)
  moe_router_entropy   mean entropy of the router distribution (nats)
  moe_<gate state>     gate schedule values, e.g. moe_temperature, moe_phase
  moe_load_<layer>_e<k>  share of tokens of expert k in that layer (with --moe-log-expert-load)
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq import metrics, utils

from ..moe.layer import MoELayer, moe_layers

COMBINE_METHODS = ("sum", "average")
STAT_KEYS = (
    "moe_experts_per_token",
    "moe_dropped_pct",
    "moe_busiest_load",
    "moe_idlest_load",
    "moe_unused_experts",
    "moe_router_entropy",
)


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


class MoELossMixin:
    def init_moe_loss(self, moe_gate_loss_wt, moe_gate_loss_combine_method, moe_z_loss_wt, moe_log_expert_load):
        if moe_gate_loss_combine_method not in COMBINE_METHODS:
            raise ValueError(
                f"--moe-gate-loss-combine-method {moe_gate_loss_combine_method!r} is not valid; choose one of: {', '.join(COMBINE_METHODS)}"
            )
        if moe_gate_loss_wt < 0 or moe_z_loss_wt < 0:
            raise ValueError("--moe-gate-loss-wt and --moe-z-loss-wt must be >= 0")
        self.moe_gate_loss_wt = moe_gate_loss_wt
        self.moe_gate_loss_combine_method = moe_gate_loss_combine_method
        self.moe_z_loss_wt = moe_z_loss_wt
        self.moe_log_expert_load = moe_log_expert_load

    def forward(self, model, sample, reduce=True):
        """The task criterion's forward (next in the MRO), plus the MoE loss."""
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        return self.add_moe_loss(model, loss, sample_size, logging_output)

    def add_moe_loss(self, model, loss, sample_size, logging_output):
        layers = [m for m in moe_layers(model) if m.metadata]
        logging_output["inner_loss"] = loss.data
        gate_term = loss.new_zeros(())
        if layers and model.training:
            balance = torch.stack([m.metadata["balance_loss"] for m in layers])
            z = torch.stack([m.metadata["z_loss"] for m in layers])
            reduce = torch.sum if self.moe_gate_loss_combine_method == "sum" else torch.mean
            gate_term = sample_size * (self.moe_gate_loss_wt * reduce(balance) + self.moe_z_loss_wt * reduce(z))
            extra = [m.metadata["extra_loss"] for m in layers if "extra_loss" in m.metadata]
            if extra:  # e.g. StableMoE's routing distillation, weighted by the gate itself
                gate_term = gate_term + sample_size * reduce(torch.stack(extra))
            gate_term = gate_term.to(loss.dtype)
            loss = loss + gate_term
        logging_output["loss"] = loss.data
        logging_output["moe_gate_loss"] = gate_term.data
        if layers:
            logging_output.update(routing_summary(layers, self.moe_log_expert_load))
        return loss, sample_size, logging_output


def routing_summary(layers: List[MoELayer], per_expert: bool) -> Dict[str, float]:
    """Mean over layers of each routing statistic (python floats, summable across workers)."""
    stats: Dict[str, List[float]] = {k: [] for k in STAT_KEYS}
    out: Dict[str, float] = {}
    for m in layers:
        md = m.metadata
        load = md["tokens_per_expert"].float()
        mean_load = load.mean().clamp(min=1e-9)
        stats["moe_experts_per_token"].append(md["experts_per_token"])
        stats["moe_dropped_pct"].append(100.0 * md["dropped_frac"])
        stats["moe_busiest_load"].append(load.max() / mean_load)
        stats["moe_idlest_load"].append(load.min() / mean_load)
        stats["moe_unused_experts"].append((load == 0).sum().float())
        stats["moe_router_entropy"].append(md["router_entropy"])
        if per_expert and m.is_sparse:
            share = load / load.sum().clamp(min=1)
            for e, v in enumerate(share.tolist()):
                out[f"moe_load_{m.layer_name}_e{e}"] = v
    for k, v in stats.items():
        out[k] = torch.stack([torch.as_tensor(x, dtype=torch.float) for x in v]).mean().item()
    gate_state = layers[0].gate.state_for_logging()
    for k, v in gate_state.items():
        out[f"moe_{k}"] = float(v)
    # 0 = expert-diversify (dense base expert), then the gate's own phase (DTS: 1 soft, 2 hard), else 1
    out["moe_phase"] = float(gate_state.get("phase", 1)) if layers[0].is_sparse else 0.0
    out["moe_count"] = 1
    return out


def reduce_moe_metrics(logging_outputs) -> None:
    """Log the MoE keys; call before the task criterion's reduce_metrics."""
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    inner = sum(log.get("inner_loss", 0) for log in logging_outputs)
    gate = sum(log.get("moe_gate_loss", 0) for log in logging_outputs)
    if sample_size > 0:
        metrics.log_scalar("inner_loss", inner / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("moe_gate_loss", gate / sample_size / math.log(2), sample_size, round=4)
    count = sum(log.get("moe_count", 0) for log in logging_outputs)
    if count == 0:
        return
    keys = set()
    for log in logging_outputs:
        keys.update(k for k in log if k.startswith("moe_") and k not in ("moe_count", "moe_gate_loss"))
    for k in sorted(keys):
        total = sum(log.get(k, 0) for log in logging_outputs)
        metrics.log_scalar(k, total / count, count, round=3)


def log_ppl_from_inner_loss(logging_outputs) -> None:
    """Perplexity of the task loss alone, when the loss is per token (registered before the
    parent criterion derives it from the total loss, which would include the balance loss)."""
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    if sample_size > 0 and (ntokens == sample_size or "ntokens" not in logging_outputs[0]):
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["inner_loss"].avg))
