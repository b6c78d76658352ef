"""What keeping freed memory (core/allocator.py) is worth: Lite0's forward to the stage-map cut and a partial
fine-tuning step, each in a fresh process with the allocator tuning on and off; prints photos per second of wall time
and of CPU time (what survives a busy machine), system time and page faults.

    python bench/allocator_speed.py [--batch 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from core.models.networks import build_backbone
from core.models.stages import Trunk, Tail
batch, repeats = int(sys.argv[1]), int(sys.argv[2])
backbone, _ = build_backbone("efficientnet_lite0")
x = torch.randn(batch, 3, 288, 395)
figures = {}
for name in ("forward to the cut", "partial training step"):
    def step():
        if name == "forward to the cut":
            with torch.inference_mode():
                Trunk(backbone.eval())(x)
        else:
            tail = Tail(backbone.train(), "blocks.5")
            maps = torch.randn(batch, 192, 9, 13)
            tail(maps).sum().backward()
    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        step()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    photos = batch * repeats
    figures[name] = {"per_wall_s": photos / wall, "per_cpu_s": photos / (user + system),
                     "system_share": system / (user + system), "page_faults": (r1.ru_minflt - r0.ru_minflt) / repeats}
print(json.dumps(figures))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for keep in ("1", "0"):
        env = os.environ | {"BINSIGHT_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.repeats)], cwd=ROOT, env=env,
                             check=True, capture_output=True, text=True).stdout
        for name, figure in json.loads(out.strip().splitlines()[-1]).items():
            print(f"keep freed memory {'on ' if keep == '1' else 'off'}  {name:22s} {figure['per_wall_s']:6.1f} photos/s "
                  f"(wall)  {figure['per_cpu_s']:6.1f} per CPU-s  system {figure['system_share']:.0%}  "
                  f"{figure['page_faults']:,.0f} page faults a batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
