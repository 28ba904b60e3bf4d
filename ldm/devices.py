"""Where a model runs and in what precision, and the random state a checkpoint carries: the places where a CPU
and a CUDA GPU differ, written once and taking the device as a parameter, so that a CPU-only test takes each GPU
path (with a monkeypatched ``torch.cuda`` or the ``meta`` device).

- ``device_for``: a device by name (``auto`` is a GPU where torch sees one), refused at once where it is not there.
- ``autocast_dtype`` / ``autocast``: one rule for both training stages' mixed precision.
- ``enable_tf32``: fp32 matmuls and convolutions on the tensor cores of GPUs that have them.
- ``rng_state`` / ``restore_rng``: every random stream a training step draws from, saved and continued, also when
  a run resumes on another device type (a CPU generator's state is 5,056 bytes, a CUDA one's 16).
- ``restore_optimizer``: an optimizer's state loaded onto the device its parameters already train on.
- ``DIFFUSERS_LOAD``: how every diffusers model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from diffusers.utils import is_accelerate_available

from ldm.choices import PRECISIONS

# Every diffusers model loads in fp32, whatever it was saved in (fp16 releases are common): a stage casts it where
# it runs in half precision. Without accelerate, diffusers cannot load with low CPU memory: asking for it anyway
# (its default) only warns on every load and falls back.
DIFFUSERS_LOAD = {"torch_dtype": torch.float32, "low_cpu_mem_usage": is_accelerate_available()}


def device_for(name: str) -> torch.device:
    """``auto`` (a GPU if torch sees one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``meta``. A GPU asked for
    on a machine whose torch has none is refused here, not at the first tensor moved."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name}: torch {torch.__version__} sees no CUDA GPU here (its CUDA build: {torch.version.cuda}); "
            "use device=cpu or device=auto, or run on a GPU node"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs in hardware: GPUs from Ampere (compute capability 8.0) on; CPUs, whose torch kernels
    take bf16 everywhere (on 2 cores train_ldm measured 1.35x the steps/s of fp32 with it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def autocast_dtype(
    device: torch.device, precision: str, setting: str, warn: Callable[[str], Any] = print
) -> torch.dtype | None:
    """The autocast dtype of a training stage's ``precision`` (named ``setting`` in messages), or None for fp32:

    - ``fp32``: none;
    - ``auto``: bf16 on a GPU with native bf16, fp32 elsewhere (a CPU, an older GPU);
    - ``bf16``: bf16 on any device that has it natively; on an older GPU (V100, T4), where torch would emulate it
      at a fraction of fp32's speed, fp32 with a warning.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{setting}={precision!r}: choose one of {PRECISIONS}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if native_bf16(device):
        return torch.bfloat16
    if precision == "bf16":
        warn(
            f"warning: {setting}=bf16 but {torch.cuda.get_device_name(device)} has no native bf16 (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}, bf16 needs 8.0): training in fp32"
        )
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward passes' context for ``autocast_dtype``'s answer."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def enable_tf32(device: torch.device) -> bool:
    """fp32 matmuls and convolutions on TF32 tensor cores where the GPU has them (Ampere on: 8x an A100's fp32
    rate, with bf16's exponent and a 10-bit mantissa, which training tolerates); True when it is on. Torch's
    default keeps fp32 matmuls in full fp32, at a tenth of the GPU's rate."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def tf32_enabled() -> bool:
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def rng_state(device: torch.device, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random stream a step draws from on ``device``: torch's CPU one, CUDA's (dropout on a GPU draws from it),
    and the training's own ``generator`` (noise, timesteps), with the device type they belong to."""
    return {
        "device": device.type,
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng(
    state: dict[str, Any] | None, device: torch.device, generator: torch.Generator | None, reseed: int
) -> bool:
    """Continue the streams ``rng_state`` saved; True when all of them continue. A stream saved on another device
    type (a CUDA generator's 16-byte state on a CPU, or the reverse), or none saved (``state`` None: another worker
    count), starts again from ``reseed`` instead: the run goes on, not bit for bit."""
    exact = state is not None
    if state is None:
        torch.manual_seed(reseed)
    else:
        torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if state is not None and state["device"] == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            torch.cuda.manual_seed(reseed)
            exact = False
    if generator is not None:
        saved = state["generator"] if state is not None else None
        if saved is not None and saved.numel() == generator.get_state().numel():
            generator.set_state(saved)
        else:
            generator.manual_seed(reseed)
            exact = False
    return exact


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], device: torch.device) -> None:
    """Load ``saved`` into ``optimizer`` once its parameters are on ``device``: torch puts each state tensor (Adam's
    moments) on its parameter's device as it loads, never afterwards, so a model moved to the GPU after this
    would step with moments left on the CPU."""
    elsewhere = {
        str(p.device) for group in optimizer.param_groups for p in group["params"] if p.device.type != device.type
    }
    if elsewhere:
        raise RuntimeError(
            f"the optimizer's parameters are on {sorted(elsewhere)}, training runs on {device}: "
            "move the model to its device before loading the optimizer's state"
        )
    optimizer.load_state_dict(saved)
