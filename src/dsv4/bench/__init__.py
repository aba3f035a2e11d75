"""``dsv4 bench``: the roofline of each op (bytes model), its timing on a GPU against that floor and
against the reference, and the bytes its Triton kernels move, counted on the CPU.

Modules: ``bytes_model`` (minimal bytes and FLOPs), ``calls`` (an op bound to a backend),
``timing`` (CUDA events / host clock, device table), ``interp_traffic`` (the interpreter hooks),
``traffic`` (bytes per call), ``runner`` (the shape grid and the run), ``report`` (tables, JSON,
plot), ``trace`` (a profiler trace of one decode step).
"""
