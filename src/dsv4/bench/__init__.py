"""``dsv4 bench``: the roofline of each op (bytes model), its timing on a GPU against that floor and
against the reference, and the bytes its Triton kernels move, counted on the CPU.

The bytes model (minimal bytes and FLOPs) of each op is part of its descriptor (``dsv4.ops.defs``,
``dsv4.ops.costs``). Modules: ``calls`` (an op bound to a backend),
``timing`` (CUDA events / host clock, device table), ``interp_traffic`` (the interpreter hooks),
``traffic`` (bytes per call), ``runner`` (the shape grid and the run), ``report`` (tables, JSON,
plot), ``trace`` (a profiler trace of one decode step).
"""
