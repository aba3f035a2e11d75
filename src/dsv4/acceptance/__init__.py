"""The GPU acceptance run: one command that takes every figure still owed on a GPU, in a few
minutes of a bare machine, and keeps whatever it measured if a step fails or time runs out.

``benchmarks/gpu_acceptance.sh OUT_DIR`` (or ``python -m dsv4.acceptance OUT_DIR`` with ``src`` on
``PYTHONPATH``; from an installed package, which lacks the project's ``tests/``, ``benchmarks/`` and
``examples/`` the steps run, it refuses to start) writes at most eight files into ``OUT_DIR``:
``summary.md`` (ready-to-paste tables), ``acceptance.json`` (versions, every step's command, status,
time and figures, every ``dsv4 bench`` JSON), ``log.txt`` (every step's output), ``junit.xml``,
``bench-decode.png``, ``trace.json.gz``, ``ncu.csv`` and ``kernel-config.json`` (the tune's).
Modules: ``plan`` (the steps), ``runner`` (budget, timeouts, the record), ``results`` (reading
figures back), ``summary`` (the Markdown), ``environment`` (versions).
"""
