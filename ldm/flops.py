"""Model FLOPs utilisation (MFU): the FLOPs a training step computes, times steps/s, over the hardware's peak.

A step's FLOPs are counted once by torch's own counter (``FlopCounterMode``: forward and backward matmuls and
convolutions, as dispatched), not estimated from a formula, so any model and any accumulation is counted alike.
The peak is the GPU's dense rate for the training's precision (bf16, TF32 or fp32) from its data sheet; on a CPU, where
there is no data sheet to trust, a matmul of the training dtype is timed on the spot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.devices import tf32_enabled

# Dense (no sparsity) FLOP/s from the data sheets, by a fragment of torch.cuda.get_device_name; the first match
# wins, so the longer names come first: (bf16 tensor cores, TF32 tensor cores, plain fp32). V100 and T4 have no
# bf16 and no TF32: their fp16 tensor-core rate stands in the first place, None in the second.
GPU_PEAK_FLOPS: dict[str, tuple[float, float | None, float]] = {
    "H200": (989e12, 494.7e12, 66.9e12),
    "H100 PCIe": (756e12, 378e12, 51.2e12),
    "H100": (989e12, 494.7e12, 66.9e12),
    "GH200": (989e12, 494.7e12, 66.9e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L40": (181e12, 90.5e12, 90.5e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10G": (70e12, 35e12, 35e12),
    "A10": (125e12, 62.5e12, 31.2e12),
    "V100": (125e12, None, 15.7e12),
    "T4": (65e12, None, 8.1e12),
}


def step_flops(run: Callable[[], object], modules: Sequence[torch.nn.Module]) -> int:
    """The FLOPs of ``run()``: one training step's forwards and backwards, without the optimizer, on the step's
    own inputs. It is run apart and leaves no trace, so that training stays bit-exact: under the counter (a
    dispatch mode) kernels may compute in another order, so the counted pass is discarded. Torch's random
    state, the modules' buffers (BatchNorm's running statistics) and their gradients are as before."""
    buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    devices = sorted({b.device.index or 0 for m in modules for b in m.parameters() if b.is_cuda})
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counting:
        run()
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    for module in modules:
        module.zero_grad(set_to_none=True)
    return counting.get_total_flops()


def peak_flops(device: torch.device, dtype: torch.dtype | None = torch.bfloat16) -> float | None:
    """The device's peak FLOP/s for matmuls in ``dtype`` (an autocast dtype; None: fp32): for a GPU, the table's
    half-precision rate, or for fp32 its TF32 rate when TF32 is on (``ldm.devices.enable_tf32``), else its fp32
    rate (None when the GPU is not listed); on a CPU, a measurement."""
    dtype = dtype or torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rates = next((rates for key, rates in GPU_PEAK_FLOPS.items() if key in name), None)
        if rates is None:
            return None
        half, tf32, fp32 = rates
        if dtype != torch.float32:
            return half
        return tf32 if tf32 is not None and tf32_enabled() else fp32
    return measured_matmul_flops(dtype)


def measured_matmul_flops(dtype: torch.dtype, size: int = 1024, trials: int = 5, seconds: float = 0.1) -> float:
    """FLOP/s of square ``size`` matmuls on this CPU with this process's torch threads: its practical peak. The
    best of a few short trials, so that another process busy for a moment does not lower it."""
    # Its own generator: drawing from torch's global one would move a training run's random stream (a resumed
    # run would then draw other noise than one that never stopped).
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm up the kernels
    best = 0.0
    for _ in range(trials):
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * size**3 * runs / elapsed)
    return best


def performance(step_flops: float, steps_per_s: float, peak: float | None) -> dict[str, float]:
    """One worker's model TFLOP/s and, when the device's peak is known, its MFU (every worker does the same)."""
    achieved = step_flops * steps_per_s
    return {"perf/model_tflops": achieved / 1e12, **({"perf/mfu": achieved / peak} if peak else {})}
