"""Will a stage's Ray work ever fit the cluster? Checked before the work is submitted.

Ray waits forever for resources that no node has and no node the autoscaler may add will have
(a GPU worker on a CPU-only cluster, a 64 GB preprocessing task on 32 GB nodes). A job submitted with
`ray job submit` then hangs with no message. Each Ray stage of panseg therefore states what its tasks
or workers ask for, as resource bundles, and `require_resources` fails at once with what is missing.

The capacity compared against is the largest the cluster can become: the nodes alive now, plus, when
the cluster runs Ray's autoscaler, every node type it may launch (up to its `max_workers`). The rule
itself (`unmet_requirements`) is a pure function of plain dicts; only `cluster_capacity` talks to Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Where `ray up` leaves the cluster's launcher config on the head node (with the node types filled in).
RAY_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Ray's own bookkeeping resources, never asked for by panseg: left out of the check and the messages.
_BOOKKEEPING_PREFIXES = ("node:", "accelerator_type:")
_BOOKKEEPING = ("object_store_memory",)


class ClusterResourcesError(RuntimeError):
    """The cluster cannot ever hold what a stage asks for; the message says what is missing."""


@dataclass(frozen=True)
class Capacity:
    """What a cluster can offer: the shapes of its nodes (one dict per node or node type) and its totals."""

    node_shapes: tuple[dict[str, float], ...]
    totals: dict[str, float]
    autoscaling: bool = False


def unmet_requirements(bundles: list[dict[str, float]], capacity: Capacity, what: str = "task") -> list[str]:
    """What keeps `bundles` (one resource dict per task, actor or worker, all needed at once) from fitting.

    Two rules: every bundle must fit on one node shape, and the bundles together must fit in the
    totals. Returns one sentence per problem; an empty list means the request fits.
    """
    problems = []
    for bundle in dict.fromkeys(_key(b) for b in bundles):  # each distinct bundle once, in order
        need = dict(bundle)
        if not any(_fits(need, shape) for shape in capacity.node_shapes):
            problems.append(f"each {what} asks for {_show(need)} on one node, but no node "
                            f"{'type ' if capacity.autoscaling else ''}has that "
                            f"(the most any node has: {_show(_largest(capacity.node_shapes, need))})")
    totals = Counter()
    for bundle in bundles:
        totals.update({k: v for k, v in bundle.items() if v})
    for name, need in sorted(totals.items()):
        have = capacity.totals.get(name, 0.0)
        if need > have + 1e-9:
            many = len(bundles) != 1
            problems.append(f"{len(bundles)} {what}{'s need' if many else ' needs'} {_amount(name, need)} in all, "
                            f"but the cluster {'can grow to' if capacity.autoscaling else 'has'} {_amount(name, have)}")
    return problems


def require_resources(bundles: list[dict[str, float]], what: str, advice: str,
                      capacity: Capacity | None = None) -> None:
    """Raise `ClusterResourcesError` at once if the connected Ray cluster can never hold `bundles`.

    Args:
        bundles: resources of each task/actor/worker needed at the same time, e.g. [{"CPU": 1, "GPU": 1}] * 4.
        what: the name of one of them in the message ("training worker", "preprocessing task").
        advice: what the user can change, appended to the message.
        capacity: the cluster's capacity if already read (default: read it now).
    """
    problems = unmet_requirements(bundles, capacity or cluster_capacity(), what)
    if problems:
        raise ClusterResourcesError("the Ray cluster lacks the resources this job asks for: " + "; ".join(problems)
                                    + f". {advice}")


def cluster_capacity() -> Capacity:
    """The connected cluster's capacity: alive nodes, and the node types its autoscaler may add."""
    import ray

    shapes = [_checked(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    totals = _checked(ray.cluster_resources())
    groups = _autoscaler_node_types()
    if not groups:
        return Capacity(tuple(shapes), totals)
    grown = dict(totals)
    for resources, max_count in groups:
        shapes.append(resources)
        for name, value in resources.items():
            grown[name] = grown.get(name, 0.0) + value * max_count
    return Capacity(tuple(shapes), grown, autoscaling=True)


def _autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources, max_count) of each node type the cluster's autoscaler may launch, when it has one.

    Read from the autoscaler config Ray keeps in its GCS (what Ray Train's own check reads), else from
    the config `ray up` leaves on the head node (where `ray job submit` runs the stage). A cluster
    started by hand with `ray start` has neither; its capacity is the nodes it has.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: if it moves, fall back to the file and the nodes alive now
        config = None
    if config is not None and config.node_group_configs:
        return [(_checked(dict(group.resources)), int(group.max_count)) for group in config.node_group_configs
                if group.max_count != 0]
    return node_types_of_launcher_config(RAY_BOOTSTRAP_CONFIG)


def node_types_of_launcher_config(path: str | Path) -> list[tuple[dict[str, float], int]]:
    """(resources, max_workers) of each worker node type of a cluster launcher YAML (none if no file).

    Node types whose resources the file leaves for the cloud to fill in are skipped: their size is
    unknown here.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    head = config.get("head_node_type")
    types = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        count = node_type.get("max_workers", config.get("max_workers", 0))
        if name != head and resources and count:
            types.append((_checked(resources), int(count)))
    return types


def _checked(resources: dict) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items()
            if not k.startswith(_BOOKKEEPING_PREFIXES) and k not in _BOOKKEEPING}


def _fits(need: dict[str, float], shape: dict[str, float]) -> bool:
    return all(v <= shape.get(k, 0.0) + 1e-9 for k, v in need.items() if v)


def _largest(shapes: tuple[dict[str, float], ...], need: dict[str, float]) -> dict[str, float]:
    return {k: max((s.get(k, 0.0) for s in shapes), default=0.0) for k in need}


def _key(bundle: dict[str, float]) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in bundle.items() if v))


def _amount(name: str, value: float) -> str:
    if name == "memory":
        return f"{value / 2**30:.1f} GiB memory"
    return f"{value:g} {name}"


def _show(resources: dict[str, float]) -> str:
    return ", ".join(_amount(k, v) for k, v in sorted(resources.items())) or "nothing"


__all__ = ["Capacity", "ClusterResourcesError", "cluster_capacity", "node_types_of_launcher_config",
           "require_resources", "unmet_requirements"]
