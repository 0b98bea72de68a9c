"""The MoE layer on a GPU: every gate's fast path equals the dense reference (fp32), and the bf16
grouped-matmul path stays close to the fp32 reference. Skipped where CUDA is not available
(CI has no GPU; run it on a GPU machine: `python -m pytest -q tests/test_cuda.py`)."""

import pytest
import torch

from fairseq_evomoe.moe.gates.base import GATE_REGISTRY

from moe_helpers import fast_and_reference, make_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("gate", sorted(GATE_REGISTRY))
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_fast_path_equals_reference_on_cuda(gate, capacity_factor):
    layer = make_layer(gate, num_experts=8, dim=64, ffn=128, capacity_factor=capacity_factor).cuda().train()
    x = torch.randn(512, 64, device="cuda", requires_grad=True)
    ids = torch.randint(4, 100, (512,), device="cuda")
    fast, ref = fast_and_reference(layer, x, ids)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(fast)
    gx_fast, = torch.autograd.grad((fast * g).sum(), x)
    fast2, ref2 = fast_and_reference(layer, x, ids)
    gx_ref, = torch.autograd.grad((ref2 * g).sum(), x)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-3, atol=1e-4)


def test_bf16_grouped_path_matches_the_reference():
    """bf16 uses torch's grouped matmul on Hopper; compared with the per-expert reference on the
    same routing decision (bf16 can flip close routing decisions against an fp32 run)."""
    layer = make_layer("top1", num_experts=8, dim=128, ffn=256, capacity_factor=0.0).cuda().train().to(torch.bfloat16)
    x = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16)
    fast, ref = fast_and_reference(layer, x)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=3e-2, atol=3e-2 * ref.float().abs().max().item())


def test_spawn_on_cuda_matches_cpu():
    """The expert spawn and the fresh gate are drawn from seeded CPU generators, so a spawn on a
    GPU gives exactly the CPU result."""
    from fairseq_evomoe.evomoe.diversify import SpawnSettings, spawn_experts

    cpu = make_layer("dts", num_experts=4, dim=32, ffn=64, seed=0)
    gpu = make_layer("dts", num_experts=4, dim=32, ffn=64, seed=0).cuda()
    for layer in (cpu, gpu):
        layer.spawned.fill_(False)
        layer.layer_name = "dec1"
    for mode in ("mask", "reinit", "noise", "copy"):
        spawn_experts(cpu, SpawnSettings(mode, 0.5, seed=3))
        spawn_experts(gpu, SpawnSettings(mode, 0.5, seed=3))
        for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
            torch.testing.assert_close(a, b.cpu(), msg=f"{mode}: {name}")
