"""The validated `space:` of search.yaml as Ray Tune domains."""

from __future__ import annotations

from typing import Any

from ray import tune


def to_domain(spec: Any) -> Any:
    """One space entry -> a Ray Tune domain (or the constant itself)."""
    if not isinstance(spec, dict):
        return spec
    form, args = next(iter(spec.items()))
    if form == "grid":
        return tune.grid_search(list(args))
    if form == "choice":
        return tune.choice(list(args))
    if form == "uniform":
        return tune.uniform(*args)
    if form == "loguniform":
        return tune.loguniform(*args)
    if form == "quniform":
        return tune.quniform(*args)
    if form == "qloguniform":
        return tune.qloguniform(*args)
    if form == "randint":
        return tune.randint(*args)
    if form == "qrandint":
        return tune.qrandint(*args)
    raise ValueError(f"unknown domain {form!r}")  # search_config validated this already


def param_space(space: dict[str, Any]) -> dict[str, Any]:
    return {key: to_domain(spec) for key, spec in space.items()}
