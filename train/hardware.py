"""The process and the hardware: OpenMP wait policy, glibc's allocator, and the device/precision TRL trains with.

Measured numbers are in the README ("Performance"). In short:

- OpenMP threads spinning at barriers (libgomp's default) stall every op when other work shares the cores;
  sleeping ones (`OMP_WAIT_POLICY=PASSIVE`) are slower on an idle CPU. `configure_process()` chooses by load, and
  must run before torch is imported (libgomp reads the policy once), so only the scripts' `__main__` call it.
- glibc hands tensors over 32 MiB (the LM head's logits) back to the OS on free, so they are page-faulted and
  zeroed again every step; `keep_freed_memory` keeps freed memory for reuse.
- On a machine without an accelerator: no gradient checkpointing (a small model's activations fit in RAM), and bf16
  only with native bf16 matmuls (emulated bf16 is much slower than fp32). `hardware_defaults` gives these as parser
  defaults; a recipe or flag that sets one wins, and the saved recipe keeps only what the user set.
"""

import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# CPU flags with native bf16 matmuls (AVX512-BF16 on Cooper Lake/Sapphire Rapids/Zen 4, AMX on Sapphire Rapids+)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8

# oneDNN (PyTorch's CPU matmuls) keeps up to 1024 primitives, one per matmul shape, each with its own buffers; batches
# of varying length make new shapes all run. 64 hold a step's shapes. Measured on the quickstart (AMD EPYC with
# AVX512-BF16, mimalloc): SFT peak 2.73 -> 2.42 GiB, DPO 2.59 -> 2.35 GiB, stage times within noise (README).
ONEDNN_CACHE_CAPACITY = "64"
# What configure_process() did and why (the run manifest records it)
process_settings: dict = {}


def cpu_busy_fraction(seconds: float = 0.25, stat: str | Path = "/proc/stat") -> float | None:
    """Fraction of this machine's CPU time spent by running work over the next `seconds` (None: no /proc/stat)."""

    def sample():
        fields = [int(x) for x in Path(stat).read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # guest time is already counted in user

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return 1 - (idle1 - idle0) / (total1 - total0)


def choose_wait_policy(busy_threshold: float = 0.25) -> tuple[str | None, str]:
    """(OMP_WAIT_POLICY to set or None for libgomp's default, why), from the user's setting or the CPU's load now.

    Spinning threads make each elementwise op wait for a descheduled thread on a shared CPU (measured: README
    "Performance"); on an idle CPU spinning is what keeps back-to-back ops fast. So PASSIVE only when other work
    already uses more than `busy_threshold` of the CPU.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"], "set by the user"
    busy = cpu_busy_fraction()
    if busy is None:
        return None, "no /proc/stat to measure load: libgomp's default"
    if busy > busy_threshold:
        return "PASSIVE", f"CPU {busy:.0%} busy at start (> {busy_threshold:.0%}): threads sleep at barriers"
    return None, f"CPU {busy:.0%} busy at start: libgomp's default (threads spin)"


def configure_process() -> dict:
    """Set this process up for training or eval: OpenMP wait policy, oneDNN's cache size, no telemetry. Call first
    thing in `__main__`.

    libgomp reads the wait policy once, when torch loads it, so this must run before `import torch`.
    Returns (and keeps in `process_settings`) what it chose and why.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings telemetry when a trainer is created
    if "torch" in sys.modules:
        logger.warning("configure_process() called after torch was imported: OMP_WAIT_POLICY has no effect now")
    policy, why = choose_wait_policy()
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)  # read at the first matmul
    process_settings.update(omp_wait_policy=policy or "default", omp_wait_policy_why=why,
                            allocator=preloaded_allocator() or "the C library's malloc",
                            onednn_primitive_cache=os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    return dict(process_settings)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor listed in `cpuinfo` (empty when the file is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_supports_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU runs bf16 matmuls natively (else bf16 is emulated and slower than fp32)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def hardware_defaults(stage: str, flags: set[str] | None = None, accelerator: bool | None = None) -> dict[str, tuple]:
    """SFTConfig/DPOConfig field -> (value, why) that make TRL fast on this CPU; `{}` with a GPU (or other accelerator).

    `stage` is "sft" or "dpo". `flags` and `accelerator` default to this machine's (parameters for tests). Apply the
    values as parser defaults, which a recipe or the command line still overrides.
    """
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    if accelerator is None:
        import torch

        accelerator = torch.accelerator.is_available()
    if accelerator:
        return {}
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in BF16_CPU_FLAGS if f in flags)
    return {
        # The old name on purpose: a recipe's `gradient_checkpointing` or `activation_checkpointing` still wins
        "gradient_checkpointing": (False, "cpu: a small model's activations fit in RAM; recomputing them costs time"),
        "bf16": (bool(native), f"cpu has {native[0]}" if native else
                 "cpu has no avx512_bf16/amx_bf16: emulated bf16 is slower than fp32"),
        "use_cpu": (True, "no accelerator (transformers accepts bf16 without a GPU only with use_cpu)"),
        "dataloader_pin_memory": (False, "cpu: nothing to pin for"),
    }


def fast_cpu_overrides(stage: str, flags: set[str] | None = None, accelerator: bool | None = None) -> dict:
    """The values of `hardware_defaults`, without the reasons."""
    return {key: value for key, (value, _) in hardware_defaults(stage, flags, accelerator).items()}


def peak_rss_gib() -> float | None:
    """This process's peak resident memory in GiB (None where the OS does not report it)."""
    if sys.platform == "win32":
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def mimalloc_library() -> str | None:
    """The mimalloc shared library that the `cmeel-mimalloc` package installs (None where it is not installed).

    Preloaded (`LD_PRELOAD`, with `MIMALLOC_PURGE_DELAY=-1`: freed memory kept for reuse) it replaces glibc's malloc
    for a whole process; `scripts/quickstart.sh` does that for the training stages. Measured in the README
    ("Performance"): glibc's heap fragments across batches of different lengths, mimalloc's size classes do not.
    """
    from importlib import metadata

    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    return next((str(f.locate().resolve()) for f in files if f.name == "libmimalloc.so"), None)


def preloaded_allocator() -> str | None:
    """"mimalloc" when this process runs with mimalloc preloaded, else None (the C library's malloc)."""
    return "mimalloc" if "mimalloc" in os.environ.get("LD_PRELOAD", "") else None


def malloc_problem() -> str | None:
    """Why glibc's allocator cannot be tuned in this process, or None when it can."""
    import ctypes

    preloaded = preloaded_allocator()
    if preloaded:
        return f"{preloaded} is preloaded (LD_PRELOAD): glibc's malloc is not the one in use"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        ctypes.CDLL("libc.so.6").mallopt  # a libc without mallopt (musl) fails here
    except (OSError, AttributeError):
        return "no glibc (libc.so.6 with mallopt)"
    return None


def keep_freed_memory(device=None) -> bool:
    """Stop glibc handing large freed blocks back to the OS (on CPU `device` only, when given). Whether it applied.

    By default glibc serves allocations over 32 MiB with a fresh mmap and unmaps them on free, so every large
    tensor (the LM head's `tokens x vocabulary` logits) is page-faulted in again on every step. Raising the mmap and
    trim thresholds, with a single arena, keeps freed memory in the heap for reuse (what jemalloc/tcmalloc give
    PyTorch on CPU). The process keeps its peak memory until it exits.
    """
    import ctypes

    if device is not None and str(device).split(":")[0] != "cpu":
        return False
    if malloc_problem():
        return False
    libc = ctypes.CDLL("libc.so.6")
    # One arena: with per-thread arenas (capped at 64 MiB heaps) big blocks still came from mmap
    settings = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) for param, value in settings)
