"""The MoE layer step without host reads: off the CPU (`static_shapes`) padding stays in place and
capacity drops are skipped rows, so no shape depends on the routing.

- On the CPU with static shapes forced: the layer equals the independent reference (moe_helpers),
  on every gate, with padding and drops, through both of the experts' static paths.
- Under FakeTensorMode, where any op that needs tensor values on the host raises
  (DynamicOutputShapeException, DataDependentOutputException), a training step (forward and
  backward) of every gate with a capacity runs through.
- On a GPU (skipped without one), the same step under `torch.cuda.set_sync_debug_mode("error")`.
"""

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from fairseq_evomoe.evomoe.schedule import Phase

from moe_helpers import PAD, forward_recording_routing, make_layer, reference_layer_forward
from test_moe_layer import REFERENCE_CASES, padded_batch

# the gates whose training step with a capacity must not read on the host (BASE's solver is exempt)
SYNC_FREE_CASES = ["top1", "top2-all", "top2-random", "top2-sampling", "hash", "stablemoe", "stablemoe-stage2", "dts-hard"]


def static_layer(case, capacity_factor=1.25, path="batched", drop_policy="score"):
    opts = dict(REFERENCE_CASES[case])
    gate, droppable, num_updates = opts.pop("gate"), opts.pop("droppable"), opts.pop("num_updates", None)
    layer = make_layer(gate, capacity_factor=capacity_factor, drop_policy=drop_policy, **opts).train()
    if num_updates is not None:
        layer.gate.set_num_updates(num_updates)
    if case == "dts-hard":
        assert layer.gate.phase == Phase.HARD
    layer.static_shapes = layer.experts.static_shapes = True
    layer.experts.static_path = path
    return layer, droppable


@pytest.mark.parametrize("path", ["batched", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.25])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_static_layer_equals_independent_reference(case, capacity_factor, path):
    if path == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    layer, droppable = static_layer(case, capacity_factor, path)
    x, ids = padded_batch()
    expect_drops = True if droppable and capacity_factor == 0.5 else None if droppable and capacity_factor else False
    out, (gate_x, _), routing = forward_recording_routing(layer, x, ids)
    assert gate_x.shape[0] == ids.numel()  # the gate saw every position, padding included
    ref, _, _, kept, _ = reference_layer_forward(layer, x, ids, real_token_routing(routing, ids))
    if expect_drops is not None:
        assert (len(kept) < real_token_routing(routing, ids).token_idx.numel()) == expect_drops
    assert torch.all(out.detach()[ids.t().eq(PAD)] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert layer.metadata["num_tokens"].item() == int(ids.ne(PAD).sum())
    assert layer.metadata["tokens_per_expert"].sum().item() == len(kept)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((out * g).sum(), params, allow_unused=True, retain_graph=True)
    grads_ref = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for p, a, b in zip(params, grads, grads_ref):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def real_token_routing(routing, ids):
    """A routing over every position (time-major), restricted to its valid assignments and with
    tokens renumbered among the real ones: what the reference expects."""
    real = ids.t().reshape(-1).ne(PAD)
    number = torch.cumsum(real.long(), 0) - 1
    keep = torch.arange(routing.token_idx.numel()) if routing.valid is None else routing.valid.nonzero().squeeze(1)
    names = ("token_idx", "expert_idx", "weight", "priority") + (("rank",) if routing.rank is not None else ())
    fields = {n: getattr(routing, n).index_select(0, keep) for n in names}
    fields["token_idx"] = number[fields["token_idx"]]
    return replace(routing, valid=None, **fields)


def training_step(layer, x, ids):
    out = layer(x, ids)
    md = layer.metadata
    loss = (out * out).sum() + md["balance_loss"] + md["z_loss"] + md.get("extra_loss", 0.0)
    loss.backward()
    return out


@pytest.mark.parametrize("case", SYNC_FREE_CASES)
def test_training_step_reads_nothing_on_the_host(case):
    layer, _ = static_layer(case, capacity_factor=1.25)
    x, ids = padded_batch()
    training_step(layer, x.detach().requires_grad_(True), ids)  # a phase flag is read once, when it changes
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fids = mode.from_tensor(x.detach()).requires_grad_(True), mode.from_tensor(ids)
        out = training_step(layer, fx, fids)
        assert out.shape == x.shape and fx.grad.shape == x.shape
        # the routing statistics are device tensors too, computed without a host read
        assert layer.metadata["tokens_per_expert"].shape == (layer.num_experts,)


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host: scalar reads (item, int, float), tolist,
    and ops whose output shape depends on the values (nonzero and the like)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            self.count += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return tolist(t)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim"):
            self.count += 1
        return func(*args, **(kwargs or {}))


# dropless cases without the CPU-only index checks of one_hot (whose reads a GPU does not make)
DROPLESS_CASES = ["top1", "hash", "stablemoe", "stablemoe-stage2", "dts-soft"]


@pytest.mark.parametrize("case", DROPLESS_CASES)
def test_dropless_training_step_reads_the_host_once(case, monkeypatch):
    """Without a capacity the batched experts need the largest group on the host: one read per
    layer, which the DTS gate's soft phase shares with its selection."""
    layer, _ = static_layer(case, capacity_factor=0.0, path="batched")
    x, ids = padded_batch()
    training_step(layer, x.detach().requires_grad_(True), ids)  # a phase flag is read once, when it changes
    with HostReads(monkeypatch) as reads:
        training_step(layer, x.detach().requires_grad_(True), ids)
    assert reads.count == 1


def test_fake_mode_catches_host_reads():
    """The check above would fail on the old layer: removing padding with nonzero raises."""
    layer, _ = static_layer("top1")
    layer.static_shapes = False  # padding removed first, as on the CPU
    x, ids = padded_batch()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        with pytest.raises((DynamicOutputShapeException, DataDependentOutputException)):
            layer(mode.from_tensor(x), mode.from_tensor(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", SYNC_FREE_CASES)
def test_training_step_never_waits_for_the_gpu(case, dtype):
    layer, _ = static_layer(case, capacity_factor=1.25, path=None)
    layer = layer.cuda().to(dtype)
    x, ids = padded_batch()
    x, ids = x.cuda().to(dtype).detach().requires_grad_(True), ids.cuda()
    training_step(layer, x, ids)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(layer, x, ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
