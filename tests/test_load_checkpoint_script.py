"""``benchmarks/load_checkpoint.py`` as the acceptance run's checkpoint step runs it (at ``tiny`` dims,
without expert fillers): ``write`` stores the four layers with their ratios in ``config.json``; ``load``
loads the layer asked for and prints the line the acceptance run reads back."""

from __future__ import annotations

import json
from pathlib import Path

import dsv4
from dsv4.acceptance.results import parse_checkpoint
from subprocesses import ROOT, run_python

SCRIPT = str(ROOT / "benchmarks" / "load_checkpoint.py")


def test_write_then_load_the_layer_asked_for(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    done = run_python([SCRIPT, "write", str(ckpt), "--preset", "tiny", "--experts", "0"])
    assert done.returncode == 0, done.stderr
    assert json.loads((ckpt / "config.json").read_text())["compress_ratios"] == [0, 4, 128, 4]
    done = run_python([SCRIPT, "load", str(ckpt), "--layer", "2", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    line = parse_checkpoint({}, done.stdout)
    assert line["load_line"].startswith(f"load_layer({ckpt}, 2, device=cpu): ")
    assert line["loaded_mib"] == round(dsv4.load_layer(ckpt, 2).nbytes() / 2**20, 1)  # layer 2's, an HCA layer
