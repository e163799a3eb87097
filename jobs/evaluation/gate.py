"""The promotion gate: rules on metrics, absolute and relative to a baseline version (the current @champion).

Fail closed: when the baseline exists but cannot be read (`baseline_error`: the registry unreachable, the version's
files or results unreadable), the gate fails with that reason; only a baseline alias that is not set yet lets the
absolute rules decide alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from jobs.evaluation.config import GateRule, GateSpec


@dataclass
class Check:
    metric: str
    value: float | None
    baseline: float | None
    passed: bool
    reason: str


@dataclass
class GateDecision:
    alias: str
    passed: bool
    baseline_uri: str | None
    checks: list[Check] = field(default_factory=list)
    promoted: bool = False
    note: str = ""
    baseline_error: str | None = None  # why the baseline could not be read (the gate then fails)

    @property
    def reasons(self) -> str:
        failed = [c.reason for c in self.checks if not c.passed]
        head = "pass" if self.passed else "fail"
        body = failed if failed else [c.reason for c in self.checks]
        return f"{head}: " + "; ".join(body) + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": self.reasons}


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def check_rule(
    rule: GateRule,
    value: float | None,
    baseline: float | None,
    baseline_uri: str | None,
    baseline_error: str | None = None,
) -> Check:
    m = rule.metric
    if value is None:
        return Check(m, None, baseline, False, f"{m} was not computed")
    lower = rule.better == "lower"
    problems, notes = [], []
    if rule.min is not None:
        (notes if value >= rule.min else problems).append(
            f"{m} = {_fmt(value)} {'>=' if value >= rule.min else '<'} min {_fmt(rule.min)}"
        )
    if rule.max is not None:
        (notes if value <= rule.max else problems).append(
            f"{m} = {_fmt(value)} {'<=' if value <= rule.max else '>'} max {_fmt(rule.max)}"
        )
    relative = rule.max_regression is not None or rule.max_abs_regression is not None
    if relative and baseline_error is not None:
        problems.append(f"{m} = {_fmt(value)}: relative bound not checked, the baseline could not be read")
    elif relative and baseline is None:
        notes.append(f"{m} = {_fmt(value)}: no baseline, relative bound not applied")
    elif relative:
        limits = []
        if rule.max_regression is not None:
            limits.append(baseline + abs(baseline) * rule.max_regression * (1 if lower else -1))
        if rule.max_abs_regression is not None:
            limits.append(baseline + rule.max_abs_regression * (1 if lower else -1))
        limit = min(limits) if lower else max(limits)
        ok = value <= limit if lower else value >= limit
        change = (
            (value - baseline) / abs(baseline) if baseline else float("inf") if value != baseline else 0.0
        )
        text = (
            f"{m} = {_fmt(value)} vs baseline {_fmt(baseline)} ({baseline_uri}): {change:+.2%}, "
            f"{'within' if ok else 'beyond'} the allowed {'<=' if lower else '>='} {_fmt(limit)}"
        )
        (notes if ok else problems).append(text)
    return Check(m, value, baseline, not problems, "; ".join(problems or notes))


def decide(
    spec: GateSpec,
    metrics: dict[str, float],
    baseline: dict[str, float] | None,
    baseline_uri: str | None,
    baseline_error: str | None = None,
) -> GateDecision:
    """Every rule checked; `baseline_error` (the baseline exists but could not be read) fails the gate whatever
    the rules say, with that reason first."""
    checks = [
        check_rule(r, metrics.get(r.metric), (baseline or {}).get(r.metric), baseline_uri, baseline_error)
        for r in spec.rules
    ]
    if baseline_error is not None:
        checks.insert(0, Check("baseline", None, None, False, baseline_error))
    return GateDecision(
        spec.alias, all(c.passed for c in checks), baseline_uri, checks, baseline_error=baseline_error
    )
