"""Time and memory of ``dsv4.load_layer`` on a flash-sized synthetic checkpoint.

    python benchmarks/load_checkpoint.py write /tmp/dsv4-flash-ckpt   # ~0.5 GB: 4 layers + expert fillers
    python benchmarks/load_checkpoint.py load /tmp/dsv4-flash-ckpt --layer 1
    python benchmarks/load_checkpoint.py load /tmp/dsv4-flash-ckpt --layer 1 --device cuda

``write`` stores four layers of a preset (default flash-sized; compress ratios 0, 4, 128, 4) in the
published format, each with routed-expert fillers so the files are much larger than one layer's
front end; ``load`` (run it in a fresh process) loads one layer onto ``--device`` and prints wall
time, resident host memory before and at peak (``ru_maxrss``), and the loaded bytes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [0, 4, 128, 4]
EXPERTS_PER_LAYER = 8  # fillers: each expert weight is 8 MiB of FP8, like a routed expert's w1


def _rss_mib(field: str = "VmRSS") -> float:
    """Resident MiB of this process (``RssAnon``: heap; ``RssFile``: mapped file pages)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb / 1024


def write(directory: Path, preset: str, experts: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from dsv4 import PRESETS
    from fp8_checkpoint import config_json, layer_tensors, write_checkpoint

    cfg = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    shards = []
    for layer, ratio in enumerate(RATIOS):
        tensors = layer_tensors(cfg, layer, ratio)
        for e in range(experts):
            raw = torch.randint(0, 0x7E, (2048, 4096), generator=g, dtype=torch.uint8)  # finite e4m3 bytes
            tensors[f"layers.{layer}.ffn.experts.{e}.w1.weight"] = raw.view(torch.float8_e4m3fn)
            tensors[f"layers.{layer}.ffn.experts.{e}.w1.scale"] = torch.full((16, 32), 120, dtype=torch.uint8).view(
                torch.float8_e8m0fnu
            )
        shards.append(tensors)
    write_checkpoint(directory, shards, config_json(cfg, RATIOS))
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    print(f"wrote {directory}: {len(shards)} shards, {total / 2**20:.0f} MiB")


def load(directory: Path, layer: int, device: str) -> None:
    import dsv4

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context creation stays out of the load time
    before, heap, files = _rss_mib(), _rss_mib("RssAnon"), _rss_mib("RssFile")
    t0 = time.perf_counter()
    weights = dsv4.load_layer(directory, layer, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load_layer({directory}, {layer}, device={device}): {seconds:.2f} s wall; "
          f"loaded {weights.nbytes() / 2**20:.1f} MiB; "
          f"RSS {before:.0f} MiB after imports (heap {heap:.0f}, file pages {files:.0f}), "
          f"peak {peak:.0f} MiB (+{peak - before:.0f} MiB), "
          f"now {_rss_mib():.0f} MiB (heap {_rss_mib('RssAnon'):.0f}, file pages {_rss_mib('RssFile'):.0f}); "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["write", "load"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--layer", type=int, default=1, help="load: the layer")
    parser.add_argument("--device", default="cpu", help="load: where the weights go")
    parser.add_argument("--preset", default="flash", help="write: the dimensions")
    parser.add_argument("--experts", type=int, default=EXPERTS_PER_LAYER, help="write: expert fillers per layer")
    args = parser.parse_args()
    write(args.dir, args.preset, args.experts) if args.mode == "write" else load(args.dir, args.layer, args.device)


if __name__ == "__main__":
    main()
