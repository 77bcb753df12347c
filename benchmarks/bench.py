"""Time gclip against cp/cat and against load-everything scripts, side by side in one run.

    python benchmarks/bench.py --size 1G                      # all three formats
    python benchmarks/bench.py --size 1G --formats safetensors --repeat 7
    python benchmarks/bench.py --size 1G --compressed         # deflated .npz and gzip HDF5
    python benchmarks/bench.py --memory 1G,4G                 # peak RSS flat in file size?
    python benchmarks/bench.py --sharded 8 --size 128M        # serial vs --jobs vs Dask
    python benchmarks/bench.py --baseline OTHER/.venv/bin/python  # another gclip beside this one

Every command runs as its own process; commands are interleaved and repeated, and each table
shows median times, the median over rounds of each run's ratio to the floor (cp, or cat plus
Python's start-up) run in the same round, and peak memory.  The machine is shared and noisy:
only ratios from one run mean much.  ``GCLIP_NUMPY_ONLY=1`` rows time gclip without its
compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dump import parse_size

PY = shlex.quote(sys.executable)
GCLIP = f"{PY} -m gclip_cli"
SUFFIX = {"safetensors": ".safetensors", "npz": ".npz", "hdf5": ".h5"}

# The throw-away scripts gclip replaces: load everything, clip in float64, save everything.
LOAD_ALL_RESCALE = {
    "safetensors": """
import numpy as np, sys
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
n = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
a = min(1.0, 1.0 / n)
save_file({k: (v * a).astype(v.dtype) for k, v in t.items()}, sys.argv[2])
""",
    "npz": """
import numpy as np, sys
with np.load(sys.argv[1]) as z:
    t = {k: z[k] for k in z.files}
n = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
a = min(1.0, 1.0 / n)
save = np.savez_compressed if sys.argv[3] == "1" else np.savez
save(sys.argv[2], **{k: (v * a).astype(v.dtype) for k, v in t.items()})
""",
    "hdf5": """
import numpy as np, sys, h5py
with h5py.File(sys.argv[1]) as f:
    t = {k: f[k][()] for k in f}
    opts = {"compression": f[next(iter(f))].compression}
n = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
a = min(1.0, 1.0 / n)
with h5py.File(sys.argv[2], "w") as g:
    for k, v in t.items():
        g.create_dataset(k, data=(v * a).astype(v.dtype), **opts)
""",
}
LOAD_ALL_INSPECT = {
    "safetensors": "from safetensors.numpy import load_file as load\nt = load(sys.argv[1])",
    "npz": "z = np.load(sys.argv[1])\nt = {k: z[k] for k in z.files}",
    "hdf5": "import h5py\nf = h5py.File(sys.argv[1])\nt = {k: f[k][()] for k in f}",
}
INSPECT_TAIL = "\nprint(np.sqrt(sum(float(np.sum(v.astype(np.float64)**2)) for v in t.values())))"


@dataclass
class Case:
    label: str
    command: str
    output: Path | None = None  # removed (untimed) before each run
    reads: Path | None = None  # read into the page cache (untimed) before each run
    walls: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    pss_kib: list[int] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    def ratio_to(self, walls: list[float]) -> float:
        """The median over rounds of this case's time over *walls* of the same round: runs
        side by side share a minute's mood, which the ratio of two medians would not."""
        return statistics.median(a / b for a, b in zip(self.walls, walls, strict=True))

    @property
    def rss_mib(self) -> float:
        return max(self.rss_kib) / 1024

    @property
    def pss_mib(self) -> float:
        return max(self.pss_kib) / 1024


def run_once(case: Case, rss_file: Path) -> tuple[float, int, int]:
    """Wall time, peak RSS of the largest process (KiB) and peak total PSS of all its
    processes (KiB) of *case*'s command run by sh, output discarded.

    Every run starts alike: its input in the page cache (this VM's kernel pages out what has
    not been touched for a minute, DAMON's pageout scheme, so a dump warmed once may be read
    from the disk rounds later), no dirty pages left by the run before (sync), then its output
    gone.  In that order, so that the pages of the deleted output are free for this run's
    writes at once: on this VM, writing 1 GiB into pages just freed took 0.2-0.3 s of system
    time, into others up to 3 s (measured with a plain pwrite loop), which would time the
    machine's memory rather than the command.  (Freed pages stay cheap for only about half a
    second: a command that starts writing later, as gclip does after its first pass, can
    still pay; see the README's Performance section.)
    The peak RSS comes from /usr/bin/time (a child forked from this process would inherit, and
    report, this process's own peak); the total is sampled from /proc every 20 ms and counts
    pages that gclip's worker processes share once (proportional set size).
    """
    if case.reads is not None:
        read_into_cache(case.reads)
    os.sync()
    if case.output is not None:
        case.output.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), "sh", "-c", case.command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak_pss = 0
    while proc.poll() is None:
        peak_pss = max(peak_pss, tree_pss_kib(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {case.command}\n{stderr}")
    return wall, int(rss_file.read_text().split()[-1]), peak_pss


def tree_pss_kib(root: int) -> int:
    """The summed proportional set size of process *root* and all its descendants."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        proc = Path("/proc", str(pid))
        try:
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in (proc / "task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):  # gone meanwhile
            continue
    return total


def measure(cases: list[Case], repeat: int, work: Path) -> None:
    for _ in range(repeat):
        for case in cases:  # interleaved, so a noisy minute hits every case alike
            wall, rss, pss = run_once(case, work / "rss.txt")
            case.walls.append(wall)
            case.rss_kib.append(rss)
            case.pss_kib.append(pss)


def python_script(code: str) -> str:
    return f"{PY} -c {shlex.quote('import numpy as np, sys' + chr(10) + code)}"


def baseline_cases(fmt: str, dump: Path, work: Path, python: str) -> list[Case]:
    """gclip's rescale and inspect run by another interpreter (another checkout's virtual
    environment): a change's before and after, side by side in the same rounds."""
    out = work / f"baseline-out{SUFFIX[fmt]}"
    q = shlex.quote
    gclip = f"{q(python)} -m gclip_cli"
    rescale = f"{gclip} rescale {q(str(dump))} {q(str(out))} --max-norm 1"
    return [
        Case("baseline rescale", rescale, out, reads=dump),
        Case("baseline inspect", f"{gclip} inspect {q(str(dump))} --json", reads=dump),
    ]


def format_cases(fmt: str, dump: Path, work: Path, compressed: bool) -> list[Case]:
    out = work / f"out{SUFFIX[fmt]}"
    base = work / ("base" + SUFFIX[fmt])
    q = shlex.quote
    flag = "1" if compressed else "0"
    rescale = f"{GCLIP} rescale {q(str(dump))} {q(str(out))} --max-norm 1"

    def case(label: str, command: str, output: Path | None = None) -> Case:
        return Case(label, command, output, reads=dump)

    return [
        case("cp", f"cp {q(str(dump))} {q(str(work / 'cp.tmp'))}", work / "cp.tmp"),
        case("cat", f"cat {q(str(dump))} > /dev/null"),
        case("python -c 'import numpy'", f"{PY} -c 'import numpy'"),
        case("gclip rescale", rescale, out),
        case("gclip inspect", f"{GCLIP} inspect {q(str(dump))} --json"),
        case("gclip rescale -j1", f"{rescale} -j1", out),
        case("gclip inspect -j1", f"{GCLIP} inspect {q(str(dump))} --json -j1"),
        case("gclip rescale, numpy only", f"GCLIP_NUMPY_ONLY=1 {rescale}", out),
        case(
            "gclip inspect, numpy only", f"GCLIP_NUMPY_ONLY=1 {GCLIP} inspect {q(str(dump))} --json"
        ),
        case(
            "load-all rescale",
            python_script(LOAD_ALL_RESCALE[fmt]) + f" {q(str(dump))} {q(str(base))} {flag}",
            base,
        ),
        case(
            "load-all inspect",
            python_script(LOAD_ALL_INSPECT[fmt] + INSPECT_TAIL) + f" {q(str(dump))}",
        ),
    ]


def report(fmt: str, cases: list[Case], compressed: bool) -> list[tuple[str, float, float]]:
    by = {c.label: c for c in cases}
    cp = by["cp"].walls
    starts = by["python -c 'import numpy'"].walls
    floor = [a + b for a, b in zip(by["cat"].walls, starts, strict=True)]
    print(f"\n## {fmt}{' (compressed)' if compressed else ''}\n")
    print(
        "| command | median wall (s) | vs cp | vs cat+import | peak RSS, largest process "
        "(MiB) | peak PSS, all processes (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c.label} | {c.wall:.2f} | {c.ratio_to(cp):.2f}x | "
            f"{c.ratio_to(floor):.2f}x | {c.rss_mib:.0f} | {c.pss_mib:.0f} |"
        )
    rescale, inspect = by["gclip rescale"], by["gclip inspect"]
    checks = []
    for kind, case in (("rescale", rescale), ("inspect", inspect)):
        if f"baseline {kind}" in by:
            ratio = case.ratio_to(by[f"baseline {kind}"].walls)
            checks.append((f"{kind} / baseline {kind} (<= 1.05)", ratio, 1.05))
    if compressed:
        speedup = 1 / rescale.ratio_to(by["load-all rescale"].walls)
        checks.append(("rescale: load-all / gclip (>= 3)", speedup, 3.0))
    else:
        limit = 3.0 if fmt == "npz" else 2.0
        checks.append((f"rescale / cp (<= {limit:g})", rescale.ratio_to(cp), limit))
        checks.append(
            (f"inspect / (cat + import numpy) (<= {limit:g})", inspect.ratio_to(floor), limit)
        )
    for case in (rescale, inspect):
        name = case.label.removeprefix("gclip ")
        checks.append((f"{name} peak RSS of any process MiB (<= 128)", case.rss_mib, 128))
        checks.append((f"{name} peak PSS of all processes MiB (<= 128)", case.pss_mib, 128))
    return [(f"{fmt}: {name}", value, limit) for name, value, limit in checks]


def startup_cases() -> list[Case]:
    return [Case("python -c pass", f"{PY} -c pass"), Case("gclip --help", f"{GCLIP} --help")]


def report_startup(cases: list[Case]) -> list[tuple[str, float, float]]:
    print("\n## start-up\n")
    print("| command | median wall (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for c in cases:
        print(f"| {c.label} | {c.wall:.3f} | {c.rss_mib:.0f} |")
    return [("start-up: gclip --help median s (<= 0.3)", cases[-1].wall, 0.3)]


def verdicts(checks: list[tuple[str, float, float]]) -> None:
    print("\n## targets\n")
    for name, value, limit in checks:
        ok = value >= limit if ">=" in name else value <= limit
        print(f"- {'PASS' if ok else 'FAIL'} {name}: {value:.2f}")


def memory_check(sizes: list[int], work: Path, repeat: int) -> None:
    print("\n## peak memory against file size (safetensors)\n")
    print("| size (GiB) | rescale RSS / PSS (MiB) | inspect RSS / PSS (MiB) |")
    print("|---|---|---|")
    rows = []
    for size in sizes:
        dump = work / f"mem{size >> 20}M.safetensors"
        prepare_dump(dump, size, compressed=False)
        cases = format_cases("safetensors", dump, work, False)[3:5]
        measure(cases, repeat, work)
        rows.append([m for c in cases for m in (c.rss_mib, c.pss_mib)])
        figures = [f"{c.rss_mib:.0f} / {c.pss_mib:.0f}" for c in cases]
        print(f"| {dump.stat().st_size / 2**30:.2f} | {' | '.join(figures)} |")
    spread = max(max(r) - min(r) for r in zip(*rows, strict=True))
    print(
        f"\n- {'PASS' if spread <= 16 else 'FAIL'} spread of any figure across sizes "
        f"(<= 16 MiB): {spread:.1f}"
    )


def byte_compile_baseline(python: str) -> None:
    """Byte-compile the gclip that *python* imports, as byte_compile_gclip does this one."""
    code = "import compileall, pathlib, gclip_cli; "
    code += "compileall.compile_dir(pathlib.Path(gclip_cli.__file__).parent, quiet=1)"
    subprocess.run([python, "-c", code], check=True)


def byte_compile_gclip() -> None:
    """Time gclip as pip installs it: byte-compiled.  An editable install run with
    PYTHONDONTWRITEBYTECODE=1 (as on this machine) would otherwise compile every module of
    gclip again at each start, about 60 ms that no installed copy spends."""
    import compileall

    import gclip_cli

    compileall.compile_dir(Path(gclip_cli.__file__).parent, quiet=1)


def prepare_dump(path: Path, size: int, compressed: bool) -> None:
    """Write the dump once (in a child process, keeping this one small), then read it into the
    page cache, so that no timed run waits for the disk."""
    if not path.exists():
        script = Path(__file__).resolve().parent / "make_dump.py"
        flags = ["--compressed"] if compressed else []
        subprocess.run(
            [sys.executable, str(script), str(path), "--size", str(size), *flags],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    read_into_cache(path)


def read_into_cache(path: Path) -> None:
    with open(path, "rb") as dump:
        while dump.read(16 << 20):
            pass


def sharded_check(shards: int, size: int, work: Path, repeat: int) -> None:
    """Serial, --jobs 2 and --scheduler local:2 on a sharded checkpoint, side by side."""
    folder = work / f"shards{shards}x{size >> 20}M"
    folder.mkdir(exist_ok=True)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        prepare_dump(folder / name, size, compressed=False)  # seeded alike; sizes are what matter
        weight_map[f"shard{i}"] = name
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    q = shlex.quote
    out = work / "sharded-out"
    base = f"{GCLIP} rescale {q(str(index))} --out-dir {q(str(out))} --max-norm 1"
    cases = [
        Case("one process (-j1)", f"{base} -j1"),
        Case("default: shard by shard, each on all cores", base),
        Case("--jobs 2: two shards at once", f"{base} --jobs 2"),
        Case("--scheduler local:2", f"{base} --scheduler local:2"),
    ]
    measure(cases, repeat, work)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"\n## sharded: {shards} shards, {total / 2**30:.2f} GiB\n")
    print("| run | median wall (s) | speed-up | peak RSS (MiB) | peak PSS (MiB) |")
    print("|---|---|---|---|---|")
    for case in cases:
        print(
            f"| {case.label} | {case.wall:.2f} | {cases[0].wall / case.wall:.2f}x | "
            f"{case.rss_mib:.0f} | {case.pss_mib:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument(
        "--formats", help="default: safetensors,npz,hdf5 (npz,hdf5 with --compressed)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compressed", action="store_true")
    parser.add_argument("--memory", help="comma-separated sizes for the RSS check, e.g. 1G,4G")
    parser.add_argument(
        "--sharded",
        type=int,
        metavar="N",
        help="time a checkpoint of N shards of --size each instead",
    )
    parser.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="also time the gclip this interpreter imports (e.g. a checkout before a change)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gclip-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    byte_compile_gclip()
    if args.baseline:
        byte_compile_baseline(args.baseline)
    version = subprocess.run(
        [*shlex.split(GCLIP), "--version"], capture_output=True, text=True
    ).stdout
    print(
        f"# gclip benchmark: {args.size} float32 dumps with GPT-2-medium shapes, "
        f"{args.repeat} interleaved rounds, {os.cpu_count()} cores; {version.strip()}"
    )
    if args.sharded:
        sharded_check(args.sharded, parse_size(args.size), args.workdir, args.repeat)
        return
    if args.memory:
        memory_check([parse_size(s) for s in args.memory.split(",")], args.workdir, args.repeat)
        return
    formats = args.formats or ("npz,hdf5" if args.compressed else "safetensors,npz,hdf5")
    by_format = {}
    for fmt in formats.split(","):
        tag = "z" if args.compressed else ""
        dump = args.workdir / f"dump{args.size}{tag}{SUFFIX[fmt]}"
        prepare_dump(dump, parse_size(args.size), args.compressed)
        by_format[fmt] = format_cases(fmt, dump, args.workdir, args.compressed)
        if args.baseline:
            by_format[fmt] += baseline_cases(fmt, dump, args.workdir, args.baseline)
    # every round runs every format's cases: a bad minute on this VM then hits every format
    # alike instead of all the rounds of one
    startup = startup_cases()
    every_case = [case for cases in by_format.values() for case in cases] + startup
    measure(every_case, args.repeat, args.workdir)
    checks = []
    for fmt, cases in by_format.items():
        checks += report(fmt, cases, args.compressed)
    checks += report_startup(startup)
    verdicts(checks)


if __name__ == "__main__":
    main()
