"""Ray for `kiln data prepare`: a private Ray on this machine, or a running cluster given by
address; tasks submitted in a bounded window; Ray's failures told in one line.

Without an address Kiln starts its own Ray (`address="local"`), whatever an earlier
`ray start` recorded in /tmp/ray: a cluster that has since gone can never hang the command. With
an address, Kiln checks first that something listens there (for `auto`, at the address that
`ray start` recorded), and once connected sends a probe to every node: a node without Kiln
installed, or that does not see the output directory, is named before any work starts.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KilnError, PrepareError

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records itself
PROBE_TIMEOUT_S = 120.0
ERRORS_LOG = "errors.log"


@dataclass(frozen=True)
class RayCluster:
    """What the pipeline needs to know of the Ray it runs on."""

    cpus: int
    nodes: int
    largest_node_cpus: int
    address: str  # "local" for Kiln's own Ray
    dashboard_url: str | None = None  # the cluster's live Ray dashboard, when it runs one


@contextmanager
def ray_session(address: str | None, work: Path) -> Iterator[RayCluster]:
    """Connect to the cluster at `address`, or start Ray on this machine; shut down what was
    started. A Ray already initialised in this process (tests) is used as it is."""
    if address:
        check_address(address)
        use_ray_token_auth_if_available()  # before importing ray, which reads it at import
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)  # Kiln reports progress and errors itself
    started = False
    dashboard = None
    if not ray.is_initialized():
        try:
            context = ray.init(
                address=address or "local",
                include_dashboard=False,
                logging_level=logging.ERROR,
                configure_logging=True,
            )
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise PrepareError(
                f"cannot connect to {where}: {first_line(error)} (a cluster with token "
                "authentication needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token "
                "or RAY_AUTH_TOKEN)"
            ) from None
        started = True
        # the cluster's dashboard, when it runs one (Kiln's own local Ray runs none)
        dashboard = getattr(context, "dashboard_url", None) if address else None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if address:
            probe_nodes(nodes, work)
        node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
        yield RayCluster(
            cpus=max(1, int(ray.cluster_resources().get("CPU", 1))),
            nodes=len(nodes),
            largest_node_cpus=max([1, *node_cpus]),
            address=address or "local",
            dashboard_url=f"http://{dashboard}" if dashboard else None,
        )
    finally:
        if started:
            ray.shutdown()


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at the address
    (for `auto`: at the one `ray start` recorded in /tmp/ray, unless RAY_ADDRESS says another)."""
    recorded = address == "auto" and not os.environ.get("RAY_ADDRESS")
    if recorded:
        if not RAY_CURRENT_CLUSTER.is_file():
            raise PrepareError(
                "--ray-address auto: no Ray cluster was started on this machine (nothing in "
                f"{RAY_CURRENT_CLUSTER}); start one with `ray start --head`, or give its address"
            )
        address = RAY_CURRENT_CLUSTER.read_text().strip()
    elif address == "auto":
        address = os.environ["RAY_ADDRESS"]
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # ray:// and other forms are Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        stale = (
            f" (recorded in {RAY_CURRENT_CLUSTER}, a cluster that has stopped)" if recorded else ""
        )
        raise PrepareError(
            f"cannot reach the Ray cluster at {address}{stale}: {error.strerror or error} "
            "(start one with `ray start --head`, or leave out --ray-address to run locally)"
        ) from None


def use_ray_token_auth_if_available() -> None:
    """`ray start` turns token authentication on when a token exists, but a driver connecting by
    address does not (Ray 2.60): do for the driver what `ray start` did for the cluster."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def probe(work: str) -> str:
    """Run on every node: Kiln imports (this module is Kiln's) and the work directory is there."""
    if not Path(work).is_dir():
        return f"does not see {work}: the output directory must be on storage every node mounts"
    return ""


def probe_nodes(nodes: list[dict], work: Path) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(probe)
    pending = {
        remote.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            max_retries=0,
        ).remote(str(work)): node.get("NodeManagerAddress", node["NodeID"])
        for node in nodes
    }
    for ref, where in pending.items():
        try:
            problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise PrepareError(
                f"Ray node {where} ran no task within {PROBE_TIMEOUT_S:.0f} s (is it overloaded "
                "or unreachable from the head?)"
            ) from None
        except ray.exceptions.RayError as error:
            raise PrepareError(f"Ray node {where}: {explain(error)}") from None
        if problem:
            raise PrepareError(f"Ray node {where} {problem}")


def run_tasks(
    function: Callable[..., Any],
    calls: Iterable[tuple],
    on_result: Callable[[Any], None],
    *,
    window: int,
    num_cpus: float = 1,
) -> None:
    """Run `function(*call)` for every call as Ray tasks, at most `window` in flight (the driver
    holds only those), and hand each result to `on_result` as it arrives, in any order."""
    import ray

    remote = ray.remote(function).options(num_cpus=num_cpus, max_retries=3)
    calls = iter(calls)
    pending = []
    for call in calls:
        pending.append(remote.remote(*call))
        if len(pending) >= window:
            break
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        on_result(ray.get(finished[0]))
        call = next(calls, None)
        if call is not None:
            pending.append(remote.remote(*call))


def explain(error: BaseException) -> str:
    """One line on what went wrong in Ray."""
    import ray

    if _cannot_import_kiln(error):
        found = re.search(r"ip=([^)\s,]+)", str(error))
        on = f" on {found.group(1)}" if found else ""
        return (
            f"a worker{on} cannot import Kiln ({_import_problem(error)}): install Kiln, the same "
            "version, on every node of the Ray cluster"
        )
    if isinstance(error, ray.exceptions.RayTaskError):
        # The error Ray raises is also an instance of the cause's class and keeps the task's
        # name and node only in its text: "ray::clean_part() (pid=..., ip=...)".
        found = re.search(r"ray::(\w+)\(\) \(pid=\d+, ip=([^)\s]+)\)", str(error))
        task, where = found.groups() if found else ("Ray", "a node")
        cause = error.cause
        return f"a {task} task on {where} failed: {type(cause).__name__}: {first_line(cause)}"
    kinds = {
        ray.exceptions.ActorDiedError: "a Ray actor died",
        ray.exceptions.WorkerCrashedError: "a Ray worker process died",
        ray.exceptions.NodeDiedError: "a Ray node died",
        ray.exceptions.OutOfMemoryError: "a Ray worker ran out of memory",
        ray.exceptions.ObjectLostError: "a result was lost with its node",
        ray.exceptions.LocalRayletDiedError: "the local Ray node stopped",
    }
    for kind, what in kinds.items():
        if isinstance(error, kind):
            return f"{what}: {first_line(error)}"
    return f"Ray: {first_line(error)}"


def _cannot_import_kiln(error: BaseException) -> bool:
    """A worker failed to import Kiln's modules (the task's function could not be loaded)."""
    text = str(error)
    return "No module named 'data_pipeline'" in text or "No module named 'pretrain'" in text


def _import_problem(error: BaseException) -> str:
    found = re.search(r"No module named '[^']+'", str(error))
    return found.group(0) if found else first_line(error)


def user_error(error: BaseException) -> BaseException | None:
    """The Kiln error (a one-line user mistake) a failed Ray task raised, if it was one."""
    import ray

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return cause if isinstance(cause, KilnError) else None


def log_failure(work: Path, error: BaseException) -> Path:
    """Keep the whole traceback (with the worker's) for a bug report; return where."""
    path = work / ERRORS_LOG
    work.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write("".join(traceback.format_exception(error)) + "\n")
    return path


def current_node() -> str:
    """The Ray node a task runs on ("" outside Ray): the manifest counts the nodes that worked."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return repr(error) if not isinstance(error, str) else text
