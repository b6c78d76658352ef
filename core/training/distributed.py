"""Training in several processes with torch.distributed: the torchrun environment, the process group, the collectives
the epoch loop needs, and launching a run under `python -m torch.distributed.run` while following its progress."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import Cancelled
from core.training.config import TrainConfig, TrainingError, settings

TIMEOUT_S = float(os.environ.get("BINSIGHT_DIST_TIMEOUT_S", "120"))  # a lost rank fails collectives instead of hanging
PROGRESS_FILE = "progress.jsonl"  # rank 0 appends one JSON progress state a line; the launcher follows it
STOP_FILE = "STOP"  # the launcher creates it to cancel; rank 0 sees it and every rank stops at the same step
LAUNCH_LOG = "torchrun.log"  # what the ranks and torchrun print, kept in the run folder
TEST_DUMP_ENV = "BINSIGHT_TEST_RANK_DUMP"  # test-only: a folder where each rank writes what it trained on
TEST_KILL_ENV = "BINSIGHT_TEST_KILL_RANK"  # test-only: this rank kills itself at its first training step
TEST_NO_DROPOUT_ENV = "BINSIGHT_TEST_NO_DROPOUT"  # test-only: dropout off, so one and two processes compare exactly


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or srun/Kubernetes setting the same variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class World:
    """This process's place among the training processes; a single process is World(0, 0, 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    started_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, wanted: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK when training on GPUs, else the CPU."""
        return torch.device("cuda", self.local_rank) if wanted.type == "cuda" and self.distributed else wanted

    def sums(self, *values: float) -> list[float]:
        """The sums over all ranks of these numbers (loss totals, correct and seen counts)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_agree(self, flag: bool) -> bool:
        """True only when the flag is true on every rank (e.g. 'my batch can take a training step')."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def main_says(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (the stop request), so all ranks leave at the same step."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], device=self._collective_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average the BatchNorm running statistics over the ranks (each saw its own photos), so all agree."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data, op=dist.ReduceOp.SUM)
                buffer.data /= self.size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def eval_slice(self, n: int) -> range:
        """This rank's share of n photos to score: contiguous, disjoint, covering all, no padded duplicates."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: torch.device) -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); World() outside torchrun."""
    if not in_torchrun():
        return World()
    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if size == 1:
        return World()
    if dist.is_initialized():
        return World(rank, local_rank, size)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_S),
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    return World(rank, local_rank, size, started_group=True)


def finish(world: World) -> None:
    if world.started_group and dist.is_initialized():
        dist.destroy_process_group()


def stop_requested(out: Path, should_stop=None) -> bool:
    """Rank 0's view of a cancel: the caller's should_stop, or the STOP file a launcher left in the run folder."""
    return bool(should_stop and should_stop()) or (out / STOP_FILE).exists()


class ProgressFile:
    """on_progress for rank 0: appends each state as a JSON line to the run folder (and passes it on)."""

    def __init__(self, out: Path, then=None):
        self.path, self.then = out / PROGRESS_FILE, then

    def __call__(self, state: dict):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(state) + "\n")
        if self.then:
            self.then(state)


def test_hooks(world: World, step: int, run) -> None:
    """Test-only behaviour, off unless its environment variable is set: a rank killing itself at its first step."""
    if step == 1 and os.environ.get(TEST_KILL_ENV) == str(world.rank):
        os.kill(os.getpid(), 9)


def prepare_for_tests(model: torch.nn.Module) -> None:
    """Test-only: turn dropout off (its masks differ between one process and several) when TEST_NO_DROPOUT_ENV is set."""
    if os.environ.get(TEST_NO_DROPOUT_ENV):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0


def dump_for_tests(world: World, model: torch.nn.Module, seen: list[str]) -> None:
    """Test-only: write this rank's weight hash and the photos it trained on (when TEST_DUMP_ENV names a folder)."""
    folder = os.environ.get(TEST_DUMP_ENV)
    if not folder:
        return
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{world.rank}.json").write_text(json.dumps({"rank": world.rank, "size": world.size,
                                                                    "weights": digest.hexdigest(), "seen": seen}))


# --- launching -----------------------------------------------------------------------------------------------

def wants_launch(config: TrainConfig) -> bool:
    """Whether this call must start torchrun (several processes or nodes asked for, and not already a rank)."""
    return (config.processes > 1 or config.nnodes > 1) and not in_torchrun()


def cli_args(config: TrainConfig) -> list[str]:
    """The `python -m core train` options standing for this configuration."""
    args = []
    for item in settings(type(config)):
        value = getattr(config, item.name)
        if item.type is bool:
            if value != item.default:
                args.append(item.flag)
        elif value is not None:
            args += [item.flag, str(value)]
    return args


def torchrun_command(config: TrainConfig) -> list[str]:
    """`python -m torch.distributed.run … -m core train …`: standalone on one machine, c10d rendezvous across nodes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(config.processes),
               "--max-restarts", "0"]
    if config.nnodes > 1:
        command += ["--nnodes", str(config.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv,
                    "--rdzv-id", "binsight-" + Path(config.out).name]
    else:
        command += ["--standalone"]
    return command + ["-m", "core", "train"] + cli_args(config)


def launch(config: TrainConfig, on_progress=None, should_stop=None, poll_s: float = 0.2) -> dict:
    """Run the training under torchrun and follow rank 0's progress file; returns metrics.json (empty on a node
    whose run folder rank 0 does not write). A rank that fails fails the run with the end of the ranks' log."""
    problems = config.validate()
    if problems:
        raise TrainingError("; ".join(problems))
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (STOP_FILE, PROGRESS_FILE):
        (out / stale).unlink(missing_ok=True)
    log_path = out / LAUNCH_LOG
    with open(log_path, "ab") as log:
        # The cores are shared out between the processes (torchrun would leave each one thread).
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // config.processes))
        process = subprocess.Popen(torchrun_command(config), stdout=log, stderr=subprocess.STDOUT,
                                   env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads})
        offset, stopping = 0, False
        while True:
            finished = process.poll() is not None
            offset = _follow(out / PROGRESS_FILE, offset, on_progress)
            if finished:
                break
            if not stopping and should_stop and should_stop():
                (out / STOP_FILE).touch()
                stopping = True
            time.sleep(poll_s)
    if stopping or (out / STOP_FILE).exists():
        raise Cancelled("training was stopped")
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        raise TrainingError(f"a training process failed (torchrun exit {process.returncode}); the end of "
                            f"{log_path}:\n" + "\n".join(tail))
    metrics = out / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def _follow(path: Path, offset: int, on_progress) -> int:
    """Pass the complete lines appended to the progress file since `offset` to on_progress; the new offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            if handle.tell() < offset:
                offset = 0  # the run started the file again
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return offset
    complete = data[:data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if on_progress and line.strip():
            on_progress(json.loads(line))
    return offset + len(complete)
