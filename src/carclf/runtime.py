"""Device, precision, seeding and process topology: the thin layer below ``train`` and ``infer``.

Both use it; neither imports the other. What a GPU box needs lives here too (cuDNN autotuning, TF32 matmuls where
the recipe allows them, the process's rank and world size under ``torchrun``), so the loops stay the same on a
laptop CPU and on eight GPUs.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from carclf.errors import CarclfError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics and tracking records."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as ``torchrun`` sets them."""
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as exc:
        raise CarclfError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {exc}") from exc


def select_device(spec: str = "auto") -> torch.device:
    """``auto``: this process's GPU (its local rank under torchrun) when CUDA is there, else the CPU."""
    if spec in ("auto", "cuda") and dist_info().distributed:
        spec = "auto"  # under torchrun: this process's own GPU
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info().local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise CarclfError(f"device '{spec}' is not a device: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CarclfError(f"device '{spec}' but CUDA is not available here: use train.device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CarclfError(f"device '{spec}' but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def configure_backends(device: torch.device, tf32: bool = True, cudnn_benchmark: bool = True) -> None:
    """Settings a GPU run wants: cuDNN picks the fastest kernels for the fixed input size, and float32 matrix
    products may use TF32 on Ampere and newer (about 10 significant bits; off for recipes that need full fp32).
    Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda" or spec == "off":
        return None
    if spec == "fp16":
        return torch.float16
    if spec == "bf16" and not torch.cuda.is_bf16_supported():
        raise CarclfError("train.amp=bf16 but this GPU has no bfloat16 support: use train.amp=fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (a step whose gradients overflow is skipped and the scale lowered); bf16 and fp32
    do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def seed_everything(seed: int) -> None:
    """Seed every RNG of this process, so what follows is a pure function of (state, seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str | bool | None]:
    """What produced a run: Python, torch, timm and carclf versions, and the git commit of carclf's source (with a
    flag for uncommitted changes) when it runs from a git checkout."""
    import platform
    import subprocess
    from pathlib import Path

    import timm

    import carclf

    out: dict[str, str | bool | None] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "carclf": carclf.__version__, "git_commit": None, "git_dirty": None,
    }
    src = Path(carclf.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git here: the versions still say what ran
    return out


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings share one core's vector units, so ONNX Runtime gains
    nothing from a thread per sibling)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return max(1, (os.cpu_count() or 2) // 2)
    from pathlib import Path

    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


# The instructions inference speed depends on (Linux /proc/cpuinfo flag names): the export's choice of precision and
# the service's check that the CPU it lands on still has them (carclf.infer.precision).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "avx512_fp16")
CPU_FLAGS_ENV = "CARCLF_CPU_FLAGS"  # "avx2,fma": pretend the CPU has only these (tests; planning for another host)


def cpu_info() -> dict[str, object]:
    """This machine's CPU: ``model`` (the model name), ``machine`` (x86_64, aarch64, ...) and ``flags`` (those of
    :data:`CPU_FLAGS` it has, sorted). Read from /proc/cpuinfo on Linux; elsewhere the flags are unknown (empty),
    which every precision check treats as "no bf16 or VNNI instructions". ``CARCLF_CPU_FLAGS`` overrides the flags
    (the machine still reports its own model)."""
    import platform
    from pathlib import Path

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass  # macOS, Windows: unknown flags
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        flags = {f.strip() for f in override.split(",") if f.strip()}
    return {"model": model, "machine": platform.machine(), "flags": sorted(flags & set(CPU_FLAGS))}


# ---------------------------------------------------------------------------------------------------- distributed
def init_distributed(device: torch.device) -> DistInfo:
    """Join the ``torchrun`` process group (NCCL on GPUs, gloo on CPUs) when launched by it; a no-op otherwise."""
    from datetime import timedelta

    import torch.distributed as dist

    info = dist_info()
    if info.distributed and not dist.is_initialized():
        if device.type == "cuda":
            if device.index != info.local_rank % torch.cuda.device_count():
                raise CarclfError(
                    f"under torchrun each process uses its own GPU (cuda:{info.local_rank} here), but the device is "
                    f"'{device}': use train.device=auto (or cuda)"
                )
            torch.cuda.set_device(device)  # before the first collective: NCCL puts its buffers on this device
        # Rank 0 alone writes the out-of-fold logits (and recomputes SWA's BatchNorm statistics) at a fold's end while
        # the others wait: give that more than NCCL's default 10 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return info


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj):
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and give every rank its result; an exception there (a user error, a lock held by
    another run) is raised on every rank, so no rank waits forever in the next collective."""
    if not is_distributed():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank, this one included
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()
