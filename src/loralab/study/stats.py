"""Statistics for study cells: mean, sample std, t intervals, and the interval of a difference:
paired (the per-seed differences) when both cells ran the same seeds, Welch otherwise. No scipy:
the t CDF has a closed form for integer degrees of freedom (Abramowitz & Stegun 26.7.3/26.7.4),
which bisection inverts.

Why pairing: every cell of a study runs the same seeds, and a seed fixes the data order, the
evaluation items (data.seed, the same for all) and the starting LoRA factors of each module the
cells share (peft/init.seed_factors), so much of a run's noise is common to both cells of a seed
and cancels in their difference. `alpha` is the two-sided level of every interval: 0.05 in a
plain study; smaller per look under `--until-decided` (sequential.py)."""
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
    seeds: list | None = None  # the seed of each value, when known (results.collect): what pairs two cells

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
        return self.half_width_at(0.05)

    def half_width_at(self, alpha: float) -> float:
        """Half-width of the (1 - alpha) t interval for the mean."""
        return t_quantile(1 - alpha / 2, self.n - 1) * self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def mde(self, alpha: float = 0.05, power: float = 0.8) -> float:
        """The smallest distance from a threshold this many values detect (see Diff.mde)."""
        if self.n < 2:
            return math.nan
        return (t_quantile(1 - alpha / 2, self.n - 1) + t_quantile(power, self.n - 1)) * self.std / math.sqrt(self.n)


@dataclass(frozen=True)
class Diff:
    """mean(a) - mean(b) with its interval half-width (0: one value on a side, the means alone
    decide), the test used, the standard error and degrees of freedom (for the detectable effect)."""
    d: float
    hw: float
    test: str          # paired | Welch | none
    n: int = 0         # pairs (paired) or the smaller side (Welch)
    se: float = math.nan
    df: int = 0

    def __iter__(self):  # d, hw = difference(a, b)
        return iter((self.d, self.hw))

    def mde(self, alpha: float = 0.05, power: float = 0.8) -> float:
        """The smallest true difference this design detects with `power` at two-sided `alpha`:
        (t(1 - alpha/2, df) + t(power, df)) * se, from the observed spread and n."""
        if not self.df or not math.isfinite(self.se):
            return math.nan
        return (t_quantile(1 - alpha / 2, self.df) + t_quantile(power, self.df)) * self.se


def paired_seeds(a: Stat, b: Stat) -> list | None:
    """The seeds both cells ran (at least two, each once per cell): the pairs the difference is
    judged on. A seed only one side ran (a failed run; a seed --until-decided added for another
    claim) is left out. None: not paired (Welch)."""
    if a.seeds is None or b.seeds is None or len(a.seeds) != a.n or len(b.seeds) != b.n:
        return None
    if len(set(a.seeds)) != a.n or len(set(b.seeds)) != b.n:
        return None
    common = sorted(set(a.seeds) & set(b.seeds))
    return common if len(common) >= 2 else None


def paired_values(a: Stat, b: Stat) -> list[float] | None:
    """The per-seed differences a - b (paired_seeds), or None."""
    seeds = paired_seeds(a, b)
    if seeds is None:
        return None
    va, vb = dict(zip(a.seeds, a.values)), dict(zip(b.seeds, b.values))
    return [va[s] - vb[s] for s in seeds]


def difference(a: Stat, b: Stat, alpha: float = 0.05) -> Diff:
    """mean(a) - mean(b) and the (1 - alpha) half-width: the paired t interval of the per-seed
    differences when the cells are paired, Welch's otherwise; 0 when either side has one value."""
    diffs = paired_values(a, b)
    if diffs is not None:
        s = Stat(diffs)
        se = s.std / math.sqrt(s.n)
        return Diff(s.mean, t_quantile(1 - alpha / 2, s.n - 1) * se, "paired", s.n, se, s.n - 1)
    d = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Diff(d, 0.0, "none", min(a.n, b.n))
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Diff(d, 0.0, "Welch", min(a.n, b.n), 0.0, 0)
    df = se ** 4 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    # floored (conservative) to an integer df; the epsilon keeps 3.9999999 (float error for 4) at 4
    df = max(1, int(df + 1e-9))
    return Diff(d, t_quantile(1 - alpha / 2, df) * se, "Welch", min(a.n, b.n), se, df)


def fmt(x) -> str:
    """A number as reports print it: 4 significant digits, thousands separators for large ones."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 1e5 and float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
