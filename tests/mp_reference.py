"""A 50-digit evaluation of the AMiD row loss with mpmath, straight from the definitions (spec §1-§2):
the ground truth where float64 itself loses accuracy (lam within 1e-8 of 0 or 1, tiny alpha-beta
exponents, tiny divergences, logits near the float range). Slow: for a few short rows only."""
from __future__ import annotations

from typing import Sequence

import mpmath as mp


def row_loss(s: Sequence[float], t: Sequence[float], *, alpha: float, lam: float, divergence: str = "kl",
             order: str = "pr", ab_alpha: float = 0.2, ab_beta: float = 0.7, temperature: float = 1.0,
             dps: int = 50) -> float:
    """The loss of one row (student logits s, teacher logits t; finite or -inf) as a float."""
    with mp.workdps(dps):
        T = mp.mpf(temperature)
        sv = [mp.mpf(float(x)) / T for x in s]
        tv = [mp.mpf(float(x)) / T for x in t]

        def log_softmax(x):
            m = max(v for v in x if v != -mp.inf)
            lse = m + mp.log(mp.fsum(mp.e ** (v - m) for v in x if v != -mp.inf))
            return [v - lse if v != -mp.inf else -mp.inf for v in x]

        lp, lq = log_softmax(tv), log_softmax(sv)
        p = [mp.e ** v if v != -mp.inf else mp.mpf(0) for v in lp]
        q = [mp.e ** v if v != -mp.inf else mp.mpf(0) for v in lq]
        lam_, k = mp.mpf(lam), (1 - mp.mpf(alpha)) / 2
        if lam_ == 0:
            rt = q[:]
        elif lam_ == 1:
            rt = p[:]
        elif k == 0:
            rt = [pi ** lam_ * qi ** (1 - lam_) for pi, qi in zip(p, q)]
        else:
            rt = []
            for pi, qi in zip(p, q):
                if k < 0 and (pi == 0 or qi == 0):  # the power mean of a zero with k < 0 is 0
                    rt.append(mp.mpf(0))
                else:
                    rt.append((lam_ * pi ** k + (1 - lam_) * qi ** k) ** (1 / k))
        z = mp.fsum(rt)
        r = [x / z for x in rt]
        x, y = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[order]
        if divergence == "kl":
            # The official masked semantics: a term is dropped where a logit is -inf.
            keep = [a != -mp.inf and b != -mp.inf for a, b in zip(tv, sv)]
            return float(mp.fsum(xi * mp.log(xi / yi) for xi, yi, kp in zip(x, y, keep) if kp and xi > 0))
        a, b = mp.mpf(ab_alpha), mp.mpf(ab_beta)
        g = a + b
        return float(-(mp.fsum(xi ** a * yi ** b for xi, yi in zip(x, y)) - a / g * mp.fsum(xi ** g for xi in x)
                       - b / g * mp.fsum(yi ** g for yi in y)) / (a * b))
