"""The MFU arithmetic without Ray: torch's counter counts a step's matmuls, the CPU peak is measured."""

import torch

from ldm.flops import GPU_PEAK_FLOPS, peak_flops, performance, step_flops


def test_a_step_is_counted_as_its_forward_and_backward_matmuls_and_leaves_no_trace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.5))
    inputs = torch.randn(8, 64)
    before = ([b.clone() for b in model.buffers()], torch.get_rng_state())
    flops = step_flops(lambda: model(inputs).sum().backward(), [model])
    # forward 2*8*64*32, backward the weight's gradient as much again (the input needs none)
    assert flops == 2 * (2 * 8 * 64 * 32)
    # The counted pass is discarded: BatchNorm's statistics, the dropout's random stream
    # and the gradients are as before.
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.buffers()))
    assert torch.equal(before[1], torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_mfu_is_achieved_over_peak_and_left_out_when_the_peak_is_unknown():
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e8  # any CPU that runs the suite does more than 0.1 GFLOP/s of float32 matmul
    assert performance(2e9, 3.0, 12e9) == {"perf/model_tflops": 6e-3, "perf/mfu": 0.5}
    assert performance(2e9, 3.0, None) == {"perf/model_tflops": 6e-3}
    # The longest matching name wins: an H100 PCIe is not rated as an SXM one, an L40 not as an L4.
    names = list(GPU_PEAK_FLOPS)
    assert names.index("H100 PCIe") < names.index("H100") and names.index("L40") < names.index("L4")
