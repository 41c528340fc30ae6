"""Where training runs: device, precision, and the DistributedDataParallel process group.

Launched by `torchrun`, the RANK / WORLD_SIZE / LOCAL_RANK variables turn on DDP (NCCL on CUDA,
gloo on the CPU); a plain `python -m training` runs as a single process.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime() -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return Runtime(device=device, rank=dist.get_rank(), world_size=world_size)
    return Runtime(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def shutdown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA GPUs that support it and fp32 on the CPU.

    bf16 autocast on a CPU without AVX512-BF16/AMX runs dozens of times slower than fp32
    (measured on this project's 2-core AMD EPYC), so the CPU never gets it unless asked for.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
