"""Ray: `kiln data prepare` as a job on a Ray cluster, through Ray's Job Submission API.

The job directory (the resolved configuration, nothing else) is uploaded as the job's working
directory; the entrypoint `kiln data prepare config.yaml` runs on the head node and its Ray
tasks run across the cluster (it joins the running cluster, `ray.init(address="auto")`).
`data.path` is made absolute at submission, so it must name storage the cluster's nodes share.
Kiln must be installed on every node (`kiln` on the PATH of the Ray processes).
The job's runtime_env is the working directory alone, no `env_vars`: the Ray processes keep the
environment the cluster was started with, and data preparation logs nothing to W&B, so no API
key is sent to Ray or written into the job directory.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from data_pipeline.errors import KilnError

STATES = {
    "PENDING": "pending",
    "RUNNING": "running",
    "STOPPED": "cancelled",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
}


class RayJobError(KilnError):
    """The Ray dashboard is unreachable or refused the request."""


def client(address: str):
    from data_pipeline.runner import use_ray_token_auth_if_available

    use_ray_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - connection errors come in many types
        raise RayJobError(f"cannot reach the Ray dashboard at {address}: {error}") from None


def submit_prepare(address: str, job_dir: Path, name: str) -> str:
    """Submit `kiln data prepare` of `job_dir/config.yaml`; the Ray job id."""
    entrypoint = "kiln data prepare config.yaml --no-progress --ray-address auto"
    try:
        return client(address).submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(job_dir)},
            metadata={"kiln_run": name},
        )
    except RayJobError:
        raise
    except Exception as error:  # noqa: BLE001
        raise RayJobError(f"Ray refused the job: {error}") from None


# What the Job Submission API raises when the dashboard refuses a request (RuntimeError, e.g.
# an unknown job id) or cannot be reached (requests' and aiohttp's connection errors).
REQUEST_ERRORS = (RuntimeError, OSError)


def job_state(address: str, job_id: str) -> tuple[str, str]:
    jobs = client(address)
    try:
        raw = str(jobs.get_job_status(job_id).value)
    except REQUEST_ERRORS as error:
        raise RayJobError(f"Ray job {job_id} at {address}: {error}") from None
    return STATES.get(raw, raw.lower()), raw


def logs(address: str, job_id: str, follow: bool) -> None:
    jobs = client(address)
    if not follow:
        try:
            text = jobs.get_job_logs(job_id)
        except REQUEST_ERRORS as error:
            raise RayJobError(f"Ray job {job_id} at {address}: {error}") from None
        sys.stdout.write(text)
        return

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def cancel(address: str, job_id: str) -> None:
    jobs = client(address)
    try:
        jobs.stop_job(job_id)
    except REQUEST_ERRORS as error:
        raise RayJobError(f"Ray job {job_id} at {address}: {error}") from None
