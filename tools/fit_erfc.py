"""Fit the erfc polynomials of src/cin_vmath.h (cin_vphi, the fused GELU's normal CDF).

    python tools/fit_erfc.py            (needs mpmath: pip install mpmath)

erfc(u) = exp(-u^2) Y(q) / (1 + 2u) with q = (u - K) / (u + K): Y is smooth on q in [-1, 1).
For u in [0, u_max] (q in [-1, q_max]) Y is interpolated at Chebyshev nodes of s = A q + B in
[-1, 1] (40 digits), the series converted to powers of s (Estrin's scheme evaluates those in
log2(degree) dependent steps), and the power form evaluated in the target precision on a dense
grid against 40-digit Y: the error is printed in ulps of that precision, with A, B and the
coefficients to paste.
"""
from __future__ import annotations

import numpy as np

# (name, precision, u_max, K, degree): u_max where exp(-u^2) leaves the normal range
FITS = (("float", np.float32, 9.4, 3, 10), ("double", np.float64, 26.7, 3.5, 22))


def main() -> int:
    import mpmath as mp
    mp.mp.dps = 40

    def y_of_q(q, k):
        if q == 1:
            return 2 / mp.sqrt(mp.pi)
        u = k * (1 + q) / (1 - q)
        return (1 + 2 * u) * mp.erfc(u) * mp.exp(u * u)

    for name, dt, umax, k, deg in FITS:
        qmax = (mp.mpf(umax) - k) / (mp.mpf(umax) + k)
        a, b = 2 / (qmax + 1), (1 - qmax) / (1 + qmax)

        def q_of_s(s):
            return (s - b) / a
        n = deg + 1
        nodes = [mp.cos(mp.pi * (j + mp.mpf(1) / 2) / n) for j in range(n)]
        vals = [y_of_q(q_of_s(s), k) for s in nodes]
        cheb = [2 * mp.fsum(v * mp.cos(mp.pi * i * (j + mp.mpf(1) / 2) / n)
                            for j, v in enumerate(vals)) / n for i in range(n)]
        cheb[0] /= 2
        # T_i in powers of s (T_{i+1} = 2 s T_i - T_{i-1}), summed exactly
        t_prev, t_cur = [mp.mpf(1)], [mp.mpf(0), mp.mpf(1)]
        power = [mp.mpf(0)] * n
        for i in range(n):
            t = t_prev if i == 0 else t_cur
            if i >= 2:
                t = [mp.mpf(0)] + [2 * v for v in t_cur]
                t = [x - y for x, y in zip(t, t_prev + [mp.mpf(0)] * (len(t) - len(t_prev)))]
                t_prev, t_cur = t_cur, t
            for j, v in enumerate(t):
                power[j] += cheb[i] * v
        coef = [dt(float(v)) for v in power]

        def estrin(s):
            p, x = list(coef), dt(s)
            while len(p) > 1:
                if len(p) % 2:
                    p.append(dt(0))
                p = [dt(p[2 * i] + p[2 * i + 1] * x) for i in range(len(p) // 2)]
                x = dt(x * x)
            return p[0]
        worst = max(abs(mp.mpf(float(estrin(s))) / y_of_q(q_of_s(mp.mpf(float(s))), k) - 1)
                    for s in np.linspace(-1, 1, 4001).astype(dt))
        print(f"{name}: K = {k}, u_max = {umax}, degree {deg}: worst {float(worst):.3g} "
              f"({float(worst) / np.finfo(dt).eps:.2f} ulp)")
        print(f"  A = {mp.nstr(a, 20)}, B = {mp.nstr(b, 20)}")
        print("  " + ", ".join(mp.nstr(v, 20) for v in power))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
