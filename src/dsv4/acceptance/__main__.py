"""``python -m dsv4.acceptance OUT_DIR``: see ``dsv4.acceptance`` and docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .. import checkout
from ..arg_types import positive_float
from .out_dir import KIND, OutDirError, prepare_out_dir
from .plan import DRY, GPU, Paths, build_plan, injected_failure
from .runner import OUTPUTS, Runner

ROOT = Path(__file__).resolve().parents[3]
DRY_ENV = "DSV4_ACCEPTANCE_DRY"


PROJECT_DIRS = ("tests", "benchmarks", "examples")  # what the steps run, next to src/ in the project's tree


def missing_project_dirs(root: Path) -> list[str]:
    """The folders of ``PROJECT_DIRS`` that ``root`` lacks: all of them where ``dsv4`` is an installed
    package (``root`` is then a folder of the environment, not the project's tree)."""
    return [d for d in PROJECT_DIRS if not (root / d).is_dir()]


SOURCES = ("src/**/*.py", "src/**/*.json", "benchmarks/*.py", "examples/*.py")  # the code and configs a step runs


def source_sha256(root: Path) -> str:
    """One digest of every file of ``SOURCES`` (path and bytes; the kernels' tuned configs among them):
    names the code that ran where there is no git."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCES for p in root.glob(pattern)}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _step_names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of step names, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv4.acceptance", description=__doc__)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where summary.md, acceptance.json and the rest go")
    parser.add_argument(
        "--dry-run", action="store_true",
        help=f"the whole run on the CPU with the tiny preset and tiny budgets (also: {DRY_ENV}=1)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=positive_float,
        help=f"total seconds the steps share (default {GPU.budget_s:g}; dry run {DRY.budget_s:g})",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_step_names, help="comma-separated steps to run, in plan order (environment always runs)"
    )
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument(
        "--inject-failure", action="store_true", help="add a failing step first, to check that the rest still run"
    )
    parser.add_argument(
        "--commit", help="the commit under test, where there is no git (with git: HEAD, which it must match)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_project_dirs(ROOT)
    if missing:  # before anything is listed, run or written: every step would run a script that is not there
        print(
            "python -m dsv4.acceptance: error: its steps run the project's tests/, benchmarks/ and examples/, "
            f"and {ROOT} (two folders above this dsv4 package) has no {', '.join(d + '/' for d in missing)}: "
            "run it from a checkout of the project (benchmarks/gpu_acceptance.sh, or PYTHONPATH=src), "
            "not from an installed package",
            file=sys.stderr,
        )
        return 2
    dry = args.dry_run or os.environ.get(DRY_ENV, "") not in ("", "0")
    profile = DRY if dry else GPU
    out = Path(args.out_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="dsv4-acceptance-"))
    try:
        paths = Paths(root=ROOT, out=out, work=work, python=sys.executable)
        steps = build_plan(profile, paths)
        if args.steps:
            wanted = set(args.steps)
            unknown = wanted - {s.name for s in steps}
            if unknown:
                names = ", ".join(s.name for s in steps)
                print(f"--steps: unknown {', '.join(sorted(unknown))}; the steps are {names}", file=sys.stderr)
                return 2
            steps = [s for s in steps if s.name in wanted or s.name == "environment"]
        if args.inject_failure:
            steps.insert(1, injected_failure(paths))
        if args.list:
            for s in steps:
                print(f"{s.name} (timeout {s.timeout_s:g} s){': skipped, ' + s.skip if s.skip else ''}")
                print("\n".join("    " + shlex.join(c) for c in s.commands))
            return 0
        head, dirty = checkout.commit()
        if args.commit and head and not head.startswith(args.commit.lower()):
            print(f"--commit: {args.commit} is not this checkout's HEAD ({head})", file=sys.stderr)
            return 2
        try:
            prepare_out_dir(out, OUTPUTS)
        except OutDirError as e:
            print(e, file=sys.stderr)
            return 2
        meta = {
            "kind": KIND,
            "dry_run": dry,
            "profile": profile.name,
            "command": shlex.join(["python", "-m", "dsv4.acceptance", *(sys.argv[1:] if argv is None else argv)]),
            "commit": args.commit or head,
            "commit_dirty": dirty,
            "source_sha256": source_sha256(ROOT),
        }
        budget = profile.budget_s if args.budget_s is None else args.budget_s
        return Runner(steps, paths, budget, meta).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
