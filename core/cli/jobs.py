"""CLI for background jobs: `worker` (run queued jobs), `jobs` (list them), `submit` (queue one), `cancel`."""
from __future__ import annotations

import argparse
import json
import math
import time

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
        from core.data.loading import load_dataset

        if not args.data:
            raise UsageError("--data DIR is required for a training or a search")
        dataset = load_dataset(args.data)
        facts = describe_dataset(dataset)
        params = {**facts, "backbone": args.backbone, "mode": args.mode, "epochs": args.epochs,
                  "batch_size": args.batch_size, "lr": args.lr, "image_size": args.image_size,
                  "aspect": args.aspect, "balance": args.balance, "device": args.device}
        params = {k: v for k, v in params.items() if v is not None}
        if args.kind == "hpo":
            params.update(n_trials=args.trials, parallel=args.parallel, full_epochs=args.full_epochs or args.epochs)
            params["batch_size"] = hpo.batch_choices(facts["n_train"])[0]  # checked like a training
        problems = training_problems(params, facts["n_train"], gpu.cuda_available())
        if args.kind == "hpo" and (args.trials < 1 or args.parallel < 1):
            problems.append("--trials and --parallel must be at least 1")
        if problems:
            raise UsageError("; ".join(problems))
        if args.kind == "hpo":
            params.pop("batch_size")
    try:
        job = jobs.submit(args.kind, params)
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
    submit.add_argument("--data", default=None)
    submit.add_argument("--backbone", default=None)
    submit.add_argument("--mode", default=None, choices=["frozen", "finetune"])
    submit.add_argument("--epochs", type=int, default=None)
    submit.add_argument("--batch-size", type=int, default=None)
    submit.add_argument("--lr", type=float, default=None)
    submit.add_argument("--image-size", type=int, default=None, help="input height (default: 224 frozen, 288 finetune)")
    submit.add_argument("--aspect", type=float, default=None, help="input width / height (default: 1.0 frozen, 1.37 finetune)")
    submit.add_argument("--balance", default=None, choices=["none", "weights", "sampler"])
    submit.add_argument("--device", default="auto")
    submit.add_argument("--trials", type=int, default=10, help="hpo: number of trials")
    submit.add_argument("--parallel", type=int, default=1, help="hpo: trials at once, where resources allow")
    submit.add_argument("--full-epochs", type=int, default=None, help="hpo: epochs of the full training afterwards")
    submit.add_argument("--seconds", type=float, default=5, help="sleep: how long")
    submit.add_argument("--no-start", action="store_true", help="only queue; do not start a worker")
    submit.set_defaults(handler=_submit)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job", type=int)
    cancel.set_defaults(handler=_cancel)

