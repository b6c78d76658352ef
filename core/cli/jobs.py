"""CLI for background jobs: `worker` (run queued jobs), `jobs` (list them), `submit` (queue one), `cancel`."""
from __future__ import annotations

import argparse
import json
import math
import time

from core.cli.models import add_train_options, config_from_args
from core.errors import UsageError
from core.jobs.params import describe_dataset, training_problems


def _worker(args) -> int:
    from core import gpu
    from core.jobs import queue as jobs
    from core.jobs.worker import Worker, slot_is_held

    if args.accepts and args.slot:  # started by the app, which already knows the machine: take the slot at once
        slot, accepts = args.slot, args.accepts.split(",")
    else:
        slots = gpu.training_slots()
        slot = args.slot
        if slot is None:
            slot = next((s for s in slots if not slot_is_held(s)), None)
            if slot is None:
                raise UsageError(f"every slot ({', '.join(slots)}) already has a worker")
        elif slot not in slots:
            raise UsageError(f"no slot {slot!r} on this machine: one of {', '.join(slots)}")
        accepts = jobs.slot_accepts(slot, slots)
    idle = args.idle_exit if args.idle_exit > 0 else math.inf
    code = Worker(slot, accepts, idle_exit_s=idle, redirect_output=True).run()
    if code == 3:
        raise UsageError(f"another worker already runs jobs on {slot}")
    return code


def _jobs(args) -> int:
    from core.jobs.worker import jobs_view

    # Jobs whose worker died are requeued (a worker starts for them) or failed before they are listed.
    listed = jobs_view(args.status.split(",") if args.status else None, limit=args.limit)
    if args.json:
        print(json.dumps([{**job.__dict__, "progress": {k: v for k, v in job.progress.items()
                                                       if k not in ("history", "trials", "running")}}
                          for job in listed], indent=2, default=str))
        return 0
    if not listed:
        print("no jobs")
    for job in listed:
        fraction = job.progress.get("fraction")
        done = f"{fraction:4.0%}" if isinstance(fraction, (int, float)) else "  - "
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
        line = f"{job.id:>5}  {job.kind:<5}  {job.status:<9}  {done}  {when}  {job.run_dir or ''}"
        if job.status == "queued" and job.attempts:
            line += "  (requeued: its worker died)"
        elif job.attempts > 1:
            line += f"  (attempt {job.attempts})"
        if job.error:
            line += f"\n       {job.error}"
        print(line)
    return 0


def _submit(args) -> int:
    from core import gpu
    from core.jobs import hpo
    from core.jobs import queue as jobs
    from core.jobs.worker import ensure_workers

    if args.kind == "sleep":
        params = {"seconds": args.seconds, "device": args.device}
    else:
        from core.data.layouts.registry import load_dataset
        from core.jobs.describe import search_params, trial_epochs

        if not args.data:
            raise UsageError("--data DIR is required for a training or a search")
        facts = describe_dataset(load_dataset(args.data))
        params = facts | config_from_args(args, job=True).to_params()
        if args.kind == "train":
            problems = training_problems(params, facts["n_train"], gpu.cuda_available())
        else:  # as the Train page's search form: trials as long as --epochs (else short), then the full training
            params = search_params(params, args.trials, args.parallel, args.epochs or trial_epochs(params),
                                   args.full_epochs or params["epochs"])
            problems = hpo.search_problems(params, facts["n_train"], gpu.cuda_available())
        if problems:
            raise UsageError("; ".join(problems))
    kind = args.kind
    if getattr(args, "target", "local") == "sagemaker":
        if args.kind != "train":
            raise UsageError("--target sagemaker runs a training (submit train), not a search or a check")
        from core.jobs.sagemaker import SageMakerTarget

        target = SageMakerTarget.from_params({
            "image": args.sagemaker_image, "role": args.sagemaker_role, "instance_type": args.sagemaker_instance_type,
            "instance_count": args.sagemaker_instance_count, "output_s3": args.sagemaker_output,
            "input_s3": args.sagemaker_input or (args.data if str(args.data).startswith("s3://") else None),
            "checkpoint_s3": args.sagemaker_checkpoint, "endpoint_url": args.sagemaker_endpoint_url,
            "region": args.sagemaker_region})
        kind, params = "sagemaker", params | {"sagemaker": target.to_params(), "device": "remote"}
    try:
        job = jobs.submit(kind, params)
    except jobs.JobError as exc:
        raise UsageError(str(exc)) from None
    print(f"job {job.id} queued ({job.kind})" + (f"; output in {job.run_dir}" if job.run_dir else "")
          + f"; log {job.log_path}")
    if not args.no_start:
        ensure_workers()
    return 0


def _cancel(args) -> int:
    from core.jobs import queue as jobs

    try:
        job = jobs.cancel(args.job)
    except jobs.JobError as exc:
        raise UsageError(str(exc)) from None
    state = "cancel requested (it stops at its next check)" if job.status == "running" else job.status
    print(f"job {job.id}: {state}")
    return 0


def register(subparsers) -> None:
    worker = subparsers.add_parser("worker", help="run queued jobs in the foreground (one at a time per slot)")
    worker.add_argument("--slot", default=None, help="cpu or cuda:N (default: the first slot without a worker)")
    worker.add_argument("--accepts", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--idle-exit", type=float, default=0, help="exit after this many idle seconds (0: never)")
    worker.set_defaults(handler=_worker)

    listing = subparsers.add_parser("jobs", help="list jobs, newest first")
    listing.add_argument("--status", default=None, help="comma-separated: queued,running,done,failed,cancelled")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_jobs)

    submit = subparsers.add_parser("submit", help="queue a training, a hyperparameter search or a sleep check")
    submit.add_argument("kind", choices=["train", "hpo", "sleep"])
    add_train_options(submit, job=True)
    submit.add_argument("--trials", type=int, default=10, help="hpo: number of trials")
    submit.add_argument("--parallel", type=int, default=1, help="hpo: trials at once, where resources allow")
    submit.add_argument("--full-epochs", type=int, default=None, help="hpo: epochs of the full training afterwards")
    submit.add_argument("--seconds", type=float, default=5, help="sleep: how long")
    submit.add_argument("--no-start", action="store_true", help="only queue; do not start a worker")
    remote = submit.add_argument_group("SageMaker (submit train --target sagemaker; BINSIGHT_SAGEMAKER_* variables "
                                       "give the image, role, endpoint and region too)")
    remote.add_argument("--target", choices=["local", "sagemaker"], default="local",
                        help="where the training runs: a local worker, or a SageMaker training job")
    remote.add_argument("--sagemaker-image", default=None, help="ECR image holding this project")
    remote.add_argument("--sagemaker-role", default=None, help="execution role ARN")
    remote.add_argument("--sagemaker-instance-type", default="ml.g5.xlarge")
    remote.add_argument("--sagemaker-instance-count", type=int, default=1)
    remote.add_argument("--sagemaker-input", default=None, help="s3:// shard set (default: --data when it is s3://)")
    remote.add_argument("--sagemaker-output", default=None, help="s3:// prefix for model.tar.gz")
    remote.add_argument("--sagemaker-checkpoint", default=None, help="s3:// prefix for epoch checkpoints")
    remote.add_argument("--sagemaker-endpoint-url", default=None, help="another SageMaker-compatible API")
    remote.add_argument("--sagemaker-region", default=None)
    submit.set_defaults(handler=_submit)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job", type=int)
    cancel.set_defaults(handler=_cancel)

