"""RMSNorm of any finite row (spec §2): the power-of-two scaling both backends apply before squaring.

``mean(v^2)`` overflows fp32 once ``|v|`` nears ``2^64`` (``x = 1e30`` gives ``inf``, and ``v / inf``
zeros). A row whose ``amax`` is finite and at least ``2^48`` is therefore normalized as ``u = v * c``
with ``c = 2^(143 - E)`` (``E`` the biased exponent of ``amax``, so ``amax * c`` lies in ``[2^16, 2^17)``
and ``c`` in ``[2^-111, 2^-32]``, a normal float): ``u * 1/sqrt(mean(u^2) + eps * c^2)`` is the spec's
value, and scaling by a power of two is exact. Every other row (below ``2^48``, or holding an infinity
or NaN) takes the plain formula, bit for bit as before: ``n < 2^31`` squares below ``2^96`` each sum
to less than ``2^127``.
"""

from __future__ import annotations

RMS_SCALE_MIN_EXP = 127 + 48  # biased fp32 exponent of amax from which a row is scaled (amax >= 2^48)
RMS_SCALE_BITS = 127 + 127 + 16  # c's biased exponent is RMS_SCALE_BITS - E: amax * c in [2^16, 2^17)
FP32_EXP_INF = 255  # the biased exponent of infinities and NaN: such rows are not scaled
