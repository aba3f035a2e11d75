"""What the acceptance run found on the machine: Python, torch, triton, CUDA, the GPU, its SM
count and clocks, and whether ``ncu`` and ``nvidia-smi`` exist.

Run as its own process (``python -m dsv4.acceptance.environment PATH.json``) so that a broken
CUDA install fails this step, not the runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

# nvidia-smi fields: current and maximum clocks (MHz), power limit (W), driver
SMI_FIELDS = (
    "name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit",
    "temperature.gpu",
)  # fmt: skip
TRITON_PROPS = ("multiprocessor_count", "sm_clock_rate", "mem_clock_rate", "mem_bus_width", "max_shared_mem")


def _run(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _nvidia_smi() -> dict[str, str] | None:
    """The first GPU's ``SMI_FIELDS`` as nvidia-smi prints them, or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = _run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(SMI_FIELDS, values, strict=False))


def _tool_version(tool: str) -> str | None:
    """The last line of ``tool --version`` (``ncu``), or None when the tool is not on PATH."""
    if not shutil.which(tool):
        return None
    out = _run([tool, "--version"])
    return out.splitlines()[-1] if out else "found (no version printed)"


def collect() -> dict[str, Any]:
    """Everything the summary prints about the machine; GPU fields are None without CUDA."""
    import torch

    with contextlib.suppress(ImportError):  # first: without CUDA it chooses the interpreter before Triton loads
        from ..kernels import interpreter  # noqa: F401
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton, triton_version = None, None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "ncu": _tool_version("ncu"),
        "nvidia_smi": _nvidia_smi(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu: dict[str, Any] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "devices": torch.cuda.device_count(),
        }
        if triton is not None:
            try:  # Triton's driver reports the clocks the CUDA runtime sees (kHz)
                tprops = triton.runtime.driver.active.utils.get_device_properties(0)
                gpu["triton_device_properties"] = {k: tprops[k] for k in TRITON_PROPS if k in tprops}
            except Exception as e:  # a Triton without a CUDA driver: recorded, not fatal
                gpu["triton_device_properties"] = f"unavailable: {type(e).__name__}: {e}"
        env["gpu"] = gpu
    return env


def describe(env: dict[str, Any]) -> list[str]:
    """Human lines: versions first, then the GPU (name, SMs, clocks) or why there is none."""
    lines = [
        f"python {env['python']} ({env['machine']}, {env['cpus']} CPUs) · torch {env['torch']} · "
        f"triton {env['triton'] or 'not installed'} · CUDA {env['cuda'] or 'none (CPU build)'}"
    ]
    gpu, smi = env.get("gpu"), env.get("nvidia_smi") or {}
    if gpu:
        lines.append(
            f"GPU {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sm_count']} SMs, "
            f"{gpu['memory_gib']} GiB, L2 {gpu['l2_mib']} MiB, {gpu['devices']} device(s))"
        )
        if smi:
            lines.append(
                f"clocks: SM {smi.get('clocks.sm')} MHz (max {smi.get('clocks.max.sm')}), memory "
                f"{smi.get('clocks.mem')} MHz (max {smi.get('clocks.max.mem')}); power limit "
                f"{smi.get('power.limit')} W; driver {smi.get('driver_version')}"
            )
        tprops = gpu.get("triton_device_properties")
        if isinstance(tprops, dict) and "sm_clock_rate" in tprops:
            lines.append(
                f"clocks (CUDA runtime): SM {tprops['sm_clock_rate'] / 1e3:.0f} MHz, memory "
                f"{tprops.get('mem_clock_rate', 0) / 1e3:.0f} MHz, bus {tprops.get('mem_bus_width')} bit"
            )
    else:
        lines.append("no CUDA device: the kernels run through Triton's CPU interpreter")
    lines.append(f"ncu: {env['ncu'] or 'not found'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dsv4.acceptance.environment PATH.json", file=sys.stderr)
        return 2
    env = collect()
    print("\n".join(describe(env)))
    with open(argv[0], "w") as f:
        json.dump(env, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
