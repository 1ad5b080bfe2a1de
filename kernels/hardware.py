"""What kernel launchers ask of the GPU, asked once per device (every launch needs it), and the pipeline-depth
rule the kernels share: lower the stages until the pipelined K/V tiles fit shared memory."""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..errors import ShapeError


@functools.cache
def _properties(index: int) -> tuple[int, int]:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["multiprocessor_count"], props["max_shared_mem"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1): on any device, CPU tensors included."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def multiprocessors(device: torch.device, elsewhere: int) -> int:
    """The device's multiprocessor count; ``elsewhere`` off CUDA (the interpreter's nominal device)."""
    return _properties(device.index or 0)[0] if device.type == "cuda" else elsewhere


def shared_memory(device: torch.device) -> int | None:
    """Bytes of shared memory a block may use on ``device``; None off CUDA (the interpreter: no limit)."""
    return _properties(device.index or 0)[1] if device.type == "cuda" else None


def stages_that_fit(num_stages: int, per_stage: int, shared_memory_bytes: int | None, tiles: str) -> int:
    """``num_stages``, lowered until ``stages * per_stage`` bytes fit ``shared_memory_bytes`` (None: no limit).
    A config calibrated in 16-bit can be too large in float32, and block sizes are fixed by layouts, so only the
    stages can give. Fails when even one stage does not fit, naming ``tiles`` (what the launch asked for)."""
    if shared_memory_bytes is None or num_stages * per_stage <= shared_memory_bytes:
        return num_stages
    if per_stage > shared_memory_bytes:
        raise ShapeError(f"{tiles} need {per_stage} bytes of shared memory per stage; the device has "
                         f"{shared_memory_bytes}. Use smaller blocks (block_n) or a 16-bit dtype")
    return shared_memory_bytes // per_stage
