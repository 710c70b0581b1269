"""Statistics for study cells: mean, sample std, 95% t interval, and the Welch interval of a
difference. No scipy: the t CDF has a closed form for integer degrees of freedom
(Abramowitz & Stegun 26.7.3/26.7.4), which bisection inverts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df >= 1."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):  # cos θ, (2/3) cos³ θ, (2·4)/(3·5) cos⁵ θ, ...
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1, (1/2) cos² θ, (1·3)/(2·4) cos⁴ θ, ...
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, to ~1e-10."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided_mass(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


@dataclass
class Stat:
    values: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN below two values."""
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def half_width(self) -> float:
        """Half-width of the 95% interval for the mean: t(0.975, n-1) * std / sqrt(n)."""
        return t_quantile(0.975, self.n - 1) * self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width


def difference(a: Stat, b: Stat) -> tuple[float, float]:
    """(mean(a) - mean(b), 95% half-width by Welch; 0 when either side has one value)."""
    d = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return d, 0.0
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return d, 0.0
    df = se ** 4 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    # floored (conservative) to an integer df; the epsilon keeps 3.9999999 (float error for 4) at 4
    return d, t_quantile(0.975, max(1, int(df + 1e-9))) * se


def fmt(x) -> str:
    """A number as reports print it: 4 significant digits, thousands separators for large ones."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 1e5 and float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
