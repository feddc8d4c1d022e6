"""Placement groups: one bundle per tensor-parallel rank."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from parallel.errors import ClusterError

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class Placement:
    """Where the ranks go: bundle `bundle_indices[r]` of `group` holds rank r."""

    group: PlacementGroup
    bundle_indices: list[int]
    bundle: dict[str, float]
    owned: bool
    """Made for this engine (and removed with it), rather than the caller's own group."""


def rank_bundle(use_gpu: bool) -> dict[str, float]:
    return {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}


def acquire_placement(
    world_size: int,
    use_gpu: bool,
    strategy: str = "PACK",
    timeout_s: float = 60.0,
    current: PlacementGroup | None = None,
) -> Placement:
    """The caller's placement group when it runs in one (as a Ray Serve replica does), else a new
    group of `world_size` bundles placed within `timeout_s`, or a `ClusterError` that says what
    was asked for and what the cluster has."""
    if current is not None:
        return _reuse(current, world_size, use_gpu)
    if strategy not in STRATEGIES:
        raise ClusterError(f"placement strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    bundle = rank_bundle(use_gpu)
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy, name="")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ClusterError(
            f"the Ray cluster could not place {world_size} bundle(s) of {bundle} ({strategy}) within "
            f"{timeout_s:.0f} s; it has {_describe(ray.cluster_resources())} in all and "
            f"{_describe(ray.available_resources())} free. Look at `ray status`, lower "
            "tensor_parallel_size, or add nodes"
        ) from None
    return Placement(group, list(range(world_size)), bundle, owned=True)


def _reuse(group: PlacementGroup, world_size: int, use_gpu: bool) -> Placement:
    """Use the last `world_size` bundles of the caller's group that fit a rank (a Serve replica
    sits in the group's first bundle)."""
    kind = "GPU" if use_gpu else "CPU"
    fitting = [i for i, spec in enumerate(group.bundle_specs) if spec.get(kind, 0) >= 1]
    if len(fitting) < world_size:
        raise ClusterError(
            f"this process runs in a placement group with bundles {group.bundle_specs}; "
            f"{world_size} rank(s) need {world_size} bundles with {kind} >= 1 and it has {len(fitting)}"
        )
    chosen = fitting[-world_size:]
    bundle = {k: v for k, v in group.bundle_specs[chosen[0]].items() if k in ("CPU", "GPU")}
    return Placement(group, chosen, {kind: 1.0, **({"CPU": 1.0} if bundle.get("CPU", 0) >= 1 else {})}, owned=False)


def release_placement(placement: Placement | None) -> None:
    if placement is not None and placement.owned:
        try:
            remove_placement_group(placement.group)
        except Exception:  # already removed, or the cluster is gone
            pass


def _describe(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
    return (
        ", ".join(f"{k} {v:g}" if k != "memory" else f"memory {v / 2**30:.1f} GiB" for k, v in sorted(shown.items())) or "nothing"
    )
