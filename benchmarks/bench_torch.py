"""Time gclip on a PyTorch checkpoint against cp and against what people do with torch.

    python benchmarks/bench_torch.py --size 1G --repeat 5

The dump is ``torch.save`` of GPT-2-medium-shaped float32 gradients (make_dump.py's shapes and
values), about SIZE large.  Side by side, interleaved, each command in its own process (see
bench.py, whose measuring this uses): ``cp``, ``gclip inspect``, ``gclip rescale``, and the
script gclip replaces: ``torch.load`` + ``clip_grad_norm_`` + ``torch.save`` (and ``torch.load``
with ``mmap=True``).  Needs torch (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import GCLIP, PY, Case, byte_compile_gclip, measure, read_into_cache
from make_dump import gpt2_shapes, parse_size

WRITE_DUMP = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from make_dump import gpt2_shapes, tensors
shapes = gpt2_shapes(int(sys.argv[2]))
torch.save({n: torch.from_numpy(v) for n, v in zip(shapes, tensors(shapes, "float32", 0))},
           sys.argv[1])
"""
# torch's way: every tensor in memory, the norm as clip_grad_norm_ takes it, saved again
TORCH_RESCALE = """
import sys, torch
grads = torch.load(sys.argv[1], weights_only=True, mmap=sys.argv[3] == "1")
params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads.values()]  # pages untouched
for p, g in zip(params, grads.values()):
    p.grad = g  # mmap=True maps copy-on-write: clipping in place leaves the file alone
torch.nn.utils.clip_grad_norm_(params, 1.0)
torch.save({n: p.grad for n, p in zip(grads, params)}, sys.argv[2])
"""


def torch_cases(dump: Path, work: Path) -> list[Case]:
    q = shlex.quote
    out, base = work / "out.pt", work / "base.pt"
    rescale = f"{GCLIP} rescale {q(str(dump))} {q(str(out))} --max-norm 1"
    torch_rescale = f"{PY} -c {q(TORCH_RESCALE)} {q(str(dump))} {q(str(base))}"

    def case(label: str, command: str, output: Path | None = None) -> Case:
        return Case(label, command, output, reads=dump)

    return [
        case("cp", f"cp {q(str(dump))} {q(str(work / 'cp.tmp'))}", work / "cp.tmp"),
        case("gclip inspect", f"{GCLIP} inspect {q(str(dump))} --json"),
        case("gclip rescale", rescale, out),
        case("gclip rescale -j1", f"{rescale} -j1", out),
        case("torch.load + clip_grad_norm_ + torch.save", f"{torch_rescale} 0", base),
        case("... torch.load(mmap=True)", f"{torch_rescale} 1", base),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="approximate size of the dump")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, help="folder for the dump and outputs")
    args = parser.parse_args()
    byte_compile_gclip()
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        work = Path(folder)
        dump = work / "grads.pt"
        size = parse_size(args.size)
        here = str(Path(__file__).resolve().parent)
        subprocess.run([sys.executable, "-c", WRITE_DUMP, str(dump), str(size), here], check=True)
        read_into_cache(dump)
        cases = torch_cases(dump, work)
        measure(cases, args.repeat, work)
        shapes = gpt2_shapes(size)
        print(f"\n## {dump.stat().st_size / 2**30:.2f} GiB .pt, {len(shapes)} tensors\n")
        print("| command | median wall (s) | vs cp | peak RSS, largest process (MiB) |")
        print("|---|---|---|---|")
        cp = cases[0].walls
        for c in cases:
            print(f"| {c.label} | {c.wall:.2f} | {c.ratio_to(cp):.2f}x | {c.rss_mib:.0f} |")


if __name__ == "__main__":
    main()
