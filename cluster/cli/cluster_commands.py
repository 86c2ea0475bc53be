"""`kiln submit`, `kiln runs`, `kiln status`, `kiln logs`, `kiln cancel`, `kiln report`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from data_pipeline.errors import KilnError
from pretrain.config.errors import ConfigError

from .config_commands import add_config_arguments

SCHEDULERS = ("local", "slurm", "k8s", "ray")
WANDB_SECRET_KEY = "api-key"  # the key of the W&B API key in the Secret of --wandb-secret


def add_parser(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="Run a configuration on this machine, Slurm, Kubernetes or Ray."
    )
    add_config_arguments(submit, world_size=False)
    submit.add_argument("--scheduler", choices=SCHEDULERS, required=True)
    submit.add_argument("--nodes", type=int, default=None, metavar="N")
    placement = submit.add_mutually_exclusive_group()
    placement.add_argument("--gpus-per-node", type=int, default=None, metavar="G")
    placement.add_argument(
        "--procs-per-node", type=int, default=None, metavar="P", help="CPU-only nodes."
    )
    submit.add_argument("--run-dir", type=Path, default=None, metavar="DIR")
    submit.add_argument("--partition", metavar="P", help="Slurm partition.")
    submit.add_argument("--time", metavar="T", help="Slurm time limit, e.g. 2-00:00:00.")
    submit.add_argument("--account", metavar="A", help="Slurm account.")
    submit.add_argument(
        "--address", metavar="URL", help="Ray dashboard, e.g. http://127.0.0.1:8265."
    )
    submit.add_argument("--image", metavar="IMAGE", help="Kubernetes: container image.")
    submit.add_argument("--namespace", default="default", help="Kubernetes namespace.")
    submit.add_argument(
        "--volume-claim", metavar="PVC", help="Kubernetes: PVC holding the run directory."
    )
    submit.add_argument(
        "--wandb-secret",
        metavar="NAME",
        help="Kubernetes: the Secret holding the W&B API key (the pods' WANDB_API_KEY).",
    )
    submit.add_argument(
        "--wandb-secret-key",
        default=WANDB_SECRET_KEY,
        metavar="KEY",
        help=f"Kubernetes: the key of the API key in that Secret (default {WANDB_SECRET_KEY}).",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="Write the script or manifest; submit nothing."
    )
    submit.set_defaults(handler=_submit)  # SlurmError, RayJobError: one line, exit code 2

    runs = commands.add_parser("runs", help="List runs with state, step and loss.")
    runs.add_argument("root", nargs="?", default="runs", type=Path, metavar="ROOT")
    runs.set_defaults(handler=_runs)
    for name, text, handler in (
        ("status", "A run's state, step, losses, speed and time remaining.", "_status"),
        ("cancel", "Stop a run's job (it checkpoints where it can).", "_cancel"),
        ("report", "Plots and a Markdown summary of a run's metrics.", "_report"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("run", type=Path, metavar="RUN")
        parser.set_defaults(handler=globals()[handler])
    logs = commands.add_parser("logs", help="A run's job output.")
    logs.add_argument("run", type=Path, metavar="RUN")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.set_defaults(handler=_logs)


def _local_default(args: argparse.Namespace) -> int | None:
    """On this machine without --procs-per-node: as many processes as the layout needs."""
    if args.scheduler != "local" or args.gpus_per_node:
        return None
    from pretrain.config import load_config

    return load_config(args.config, args.overrides).world_size


def _submit(args: argparse.Namespace) -> int:
    from cluster.launch.plan import build_plan, check_wandb_key
    from cluster.rundir import check_trainable, prepare_run_dir, write_submission
    from pretrain.config import resolve_run

    run_dir = (args.run_dir or Path("runs") / Path(args.config).stem).resolve()
    if args.scheduler == "ray":
        return _submit_ray(args, run_dir)
    cfg, plan = build_plan(
        args.config,
        args.overrides,
        args.scheduler,
        run_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node or _local_default(args),
    )
    # A dry run on Slurm submits nothing: the key is looked for where sbatch runs.
    check_wandb_key(cfg, args.scheduler, args.wandb_secret, submitting=not args.dry_run)
    run = resolve_run(cfg)
    check_trainable(run)
    prepare_run_dir(run, run_dir, resume=True)
    print(
        f"kiln submit: {run.model.arch} on {plan.nodes} node(s) x {plan.procs_per_node} "
        f"process(es) = world {plan.world_size} ({args.scheduler}); run directory {run_dir}"
    )
    if args.scheduler == "local":
        return _submit_local(plan, args.dry_run)
    if args.scheduler == "slurm":
        from cluster.grace import slurm_signal_lead
        from cluster.launch.plan import wandb_key_source
        from cluster.slurm.batch import (
            EXPORT,
            SlurmOptions,
            sbatch_command,
            submit,
            write_script,
        )

        lead = slurm_signal_lead(run_dir)
        options = SlurmOptions(
            job_name=f"kiln-{run_dir.name}",
            partition=args.partition,
            time=args.time,
            account=args.account,
            python=sys.executable,
            signal_before_limit_s=lead.seconds,
        )
        script = write_script(plan, options)
        print(f"batch script: {script}")
        print(f"stop signal {lead.seconds} s before the time limit ({lead.reason})")
        if cfg.logging.wandb.mode == "online":
            source = wandb_key_source()
            where = f"from {source}" if source else "none here; submit where WANDB_API_KEY is"
            print(f"W&B API key: {where} (the job gets sbatch's environment, {EXPORT})")
        if args.dry_run:
            print(f"submit with: {shlex.join(sbatch_command(script))}")
            return 0
        job_id = submit(script)
        write_submission(run_dir, scheduler="slurm", job_id=job_id, script=str(script))
        print(f"submitted Slurm job {job_id}")
    else:
        job = _submit_k8s(args, cfg, plan, run_dir)
        if job is None:
            return 0
    _where_to_watch(cfg, run_dir)
    return 0


def _submit_local(plan, dry_run: bool) -> int:
    import os

    from cluster.launch.local import launch_local
    from cluster.launch.plan import RANK_MODULE
    from cluster.rundir import write_submission

    if plan.nodes != 1:
        raise ConfigError(f"--nodes = {plan.nodes}: the local scheduler runs on this machine only")
    command = [sys.executable, "-m", RANK_MODULE, "--run-dir", str(plan.run_dir)]
    if dry_run:
        print(" ".join(command))
        return 0
    write_submission(plan.run_dir, scheduler="local", job_id=None, pid=os.getpid())
    return launch_local(command, plan.world_size, log_dir=plan.run_dir / "logs")


def _submit_k8s(args, cfg, plan, run_dir: Path) -> str | None:
    from cluster.grace import k8s_grace_period
    from cluster.k8s.manifest import (
        job_name,
        kubectl_apply,
        kubectl_error,
        pytorchjob_manifest,
        write_manifest,
    )
    from cluster.launch.plan import RANK_MODULE, SHUTDOWN_TIMEOUT_S, WANDB_KEY
    from cluster.rundir import write_submission

    if not args.image:
        raise ConfigError("--image = None: Kubernetes needs the container image with Kiln")
    name = job_name(run_dir.name)
    # The volume is mounted where this machine sees the run directory's parent, so that the
    # run directory and absolute data paths mean the same inside the pods.
    mount = str(run_dir.parent)
    grace = k8s_grace_period(run_dir)
    # The pods read the W&B key from the Secret; its value never enters the manifest.
    secret_env = (
        {WANDB_KEY: (args.wandb_secret, args.wandb_secret_key)} if args.wandb_secret else {}
    )
    manifest = pytorchjob_manifest(
        name=name,
        image=args.image,
        nodes=plan.nodes,
        gpus_per_node=plan.gpus_per_node,
        procs_per_node=plan.procs_per_node,
        run_dir=f"{mount}/{run_dir.name}",
        command_args=[
            # torchrun passes SIGTERM on, then waits this long before killing the ranks.
            f"--shutdown-timeout={max(SHUTDOWN_TIMEOUT_S, grace.seconds)}",
            "-m",
            RANK_MODULE,
            "--run-dir",
            f"{mount}/{run_dir.name}",
        ],
        env=plan.env,
        secret_env=secret_env,
        cpu=None,
        memory=None,
        volume_claim=args.volume_claim,
        namespace=args.namespace,
        mount_path=mount,
        grace_period_s=grace.seconds,
    )
    path = write_manifest(manifest, run_dir / "pytorchjob.yaml")
    print(f"manifest: {path} (apply with: kubectl apply -f {path})")
    print(f"grace period {grace.seconds} s between SIGTERM and SIGKILL ({grace.reason})")
    if secret_env:
        print(f"W&B API key: from Secret {args.wandb_secret}, key {args.wandb_secret_key}")
    if args.dry_run:
        return None
    result = kubectl_apply(path)
    if result.returncode:
        raise ConfigError(f"--scheduler = k8s: {kubectl_error(result)}")
    write_submission(
        run_dir, scheduler="k8s", job_id=name, namespace=args.namespace, manifest=str(path)
    )
    print(f"applied PyTorchJob {name} in namespace {args.namespace}")
    return name


def _submit_ray(args: argparse.Namespace, run_dir: Path) -> int:
    from cluster.ray_jobs import submit_prepare
    from cluster.rundir import write_submission
    from data_pipeline.atomic import write_text
    from pretrain.config import dump_config, load_config

    if not args.address:
        raise ConfigError("--address = None: give the Ray dashboard, e.g. http://HEAD:8265")
    cfg = load_config(args.config, args.overrides)
    if cfg.data.path is None:
        raise ConfigError("data.path = None: the Ray job writes the shards to data.path")
    cfg.data.path = str(Path(cfg.data.path).resolve())
    job_dir = run_dir / "ray-job"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_text(job_dir / "config.yaml", dump_config(cfg))
    write_text(run_dir / "config.yaml", dump_config(cfg))
    job_id = submit_prepare(args.address, job_dir, run_dir.name)
    write_submission(run_dir, scheduler="ray", job_id=job_id, address=args.address)
    print(f"submitted `kiln data prepare` as Ray job {job_id} at {args.address}")
    print(f"shards go to {cfg.data.path}; watch: kiln status {run_dir}, kiln logs {run_dir} -f")
    return 0


def _where_to_watch(cfg, run_dir: Path) -> None:
    wandb = cfg.logging.wandb
    print(f"watch: kiln status {run_dir} | kiln logs {run_dir} --follow | kiln report {run_dir}")
    if wandb.mode == "online":
        run_id = wandb_run_id(run_dir)
        if wandb.entity:
            print(f"W&B: https://wandb.ai/{wandb.entity}/{wandb.project}/runs/{run_id}")
        else:
            print(f"W&B: project {wandb.project}, run {run_id} (your default entity)")
    elif wandb.mode == "offline":
        print(
            f"W&B (offline): {run_dir}/wandb; upload with: wandb sync {run_dir}/wandb/offline-run-*"
        )


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, chosen now if training has not started yet: the ranks' tracker
    reuses `wandb_run_id`, so the URL printed at submission is the run's."""
    import secrets
    import string

    path = run_dir / "wandb_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = run_dir / ".wandb_run_id.tmp"
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


def _state(run_dir: Path) -> str | None:
    from cluster.jobs import state_of

    try:
        found = state_of(run_dir)
    except KilnError as error:  # a scheduler that cannot answer is a state too
        return f"unknown ({error})"
    return None if found is None else found[0]


def _check_run(run: Path) -> Path:
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"RUN = {run}: not a run directory (no config.yaml)")
    return run


def _runs(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cluster.runs.render import runs_table
    from cluster.runs.summary import find_runs, summarize

    summaries = [summarize(run, _state(run)) for run in find_runs(args.root)]
    if not summaries:
        print(f"no runs under {args.root}")
        return 0
    Console().print(runs_table(summaries))
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster.runs.render import status_text
    from cluster.runs.summary import summarize

    run = _check_run(args.run)
    print(status_text(summarize(run, _state(run))))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from cluster.jobs import show_logs

    show_logs(_check_run(args.run), args.follow)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from cluster.jobs import cancel

    print(cancel(_check_run(args.run)))  # JobError, SlurmError, RayJobError: one line
    return 0


def _report(args: argparse.Namespace) -> int:
    from cluster.runs.report import write_report

    run_dir = _check_run(args.run)
    path = write_report(run_dir)
    print(f"report: {path}")
    if (run_dir / "config.yaml").is_file():  # a run that logs to MLflow gets it there too
        from pretrain.config import load_config
        from pretrain.train.tracking import upload_report

        mlflow = load_config(run_dir / "config.yaml").logging.mlflow
        run_id = upload_report(run_dir, mlflow, path.parent)  # TrackingError: one line
        if run_id is not None:
            print(f"report: also in MLflow run {run_id} (artifacts report/)")
    return 0
