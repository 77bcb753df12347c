"""Time gclip on an object in a local S3 server (moto) against the same file on disk and against
downloading it first (boto3's download_file, as ``aws s3 cp`` does) then running locally.

    python benchmarks/remote.py --size 1G --rounds 3        # needs gclip[remote-test]
    python benchmarks/remote.py --size 64M --rounds 1       # a quick check that it runs
    python benchmarks/remote.py --size 256M --baseline OTHER/.venv/bin/python   # before/after

(make_dump.py's smallest dump, GPT-2's embeddings and one block, is about 250 MiB.)  moto
keeps objects in memory and serves a ranged GET slowly (it is a test server): figures against
a real store will favour ranged reads more than these do.

For each format, each round times, one after the other: ``inspect`` and ``rescale`` of the
file on disk; of the object (``s3://``, output uploaded); and download + local run (+ upload
for rescale, with boto3's upload_file), each step in a process of its own (as ``aws s3 cp``
would be).  Prints the median seconds, each ratio to the local run and the peak RSS of the
largest process of the run (gclip's own and its children's, by /usr/bin/time).  The server runs on
127.0.0.1 on a free port, started and stopped here.  The default format is safetensors, the one
read by ranges; .npz and HDF5 objects are downloaded by gclip itself (``--formats``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from make_dump import parse_size, write_dump

SUFFIXES = {"safetensors": ".safetensors", "npz": ".npz", "hdf5": ".h5"}


def run(command: list[str], cwd: Path | None = None) -> int:
    """Run *command*; its peak RSS in KiB (the largest of it and the children it waited for),
    by /usr/bin/time: a child of this process would count this process's own peak, inherited
    at fork."""
    with tempfile.NamedTemporaryFile("r") as peak:
        timed = ["/usr/bin/time", "-f", "%M", "-o", peak.name, *command]
        done = subprocess.run(
            timed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd
        )
        if done.returncode != 0:
            raise SystemExit(f"{command} failed: {done.stderr}")
        return int(peak.read().split()[-1])


def gclip(*args: str, python: str = sys.executable) -> int:
    """gclip *args* run by *python*, from its checkout (``-m`` finds the current folder's
    package first: CHECKOUT/.venv/bin/python runs CHECKOUT's gclip_cli)."""
    return run([python, "-m", "gclip_cli", *args], cwd=Path(python).absolute().parents[2])


def boto3_step(call: str) -> int:
    """One boto3 transfer (download_file or upload_file) in a process of its own."""
    return run([sys.executable, "-c", f"import boto3; boto3.client('s3').{call}"])


def timed(work: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    peak = work()
    return time.perf_counter() - started, peak


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto's server did not start")


def cases(
    bucket: str, local: Path, work: Path, baseline: str | None = None
) -> dict[str, Callable[[], int]]:
    key = local.name
    url = f"s3://{bucket}/{key}"
    copy = work / f"copy{local.suffix}"
    out = work / f"out{local.suffix}"

    def download_then(*args: str) -> int:
        copy.unlink(missing_ok=True)
        fetched = boto3_step(f"download_file({bucket!r}, {key!r}, {str(copy)!r})")
        return max(fetched, gclip(*args))

    def download_rescale_upload() -> int:
        out.unlink(missing_ok=True)
        peak = download_then("rescale", str(copy), str(out), "--max-norm", "1")
        sent = boto3_step(f"upload_file({str(out)!r}, {bucket!r}, 'out-copied{local.suffix}')")
        return max(peak, sent)

    def rescale_local() -> int:
        out.unlink(missing_ok=True)
        return gclip("rescale", str(local), str(out), "--max-norm", "1")

    def uploaded(source: str, python: str = sys.executable) -> Callable[[], int]:
        target = f"s3://{bucket}/out{local.suffix}"
        return lambda: gclip("rescale", source, target, "--max-norm", "1", python=python)

    found = {
        "inspect, local": lambda: gclip("inspect", str(local)),
        "inspect, s3://": lambda: gclip("inspect", url),
        "inspect, download + local": lambda: download_then("inspect", str(copy)),
        "rescale, local": rescale_local,
        "rescale, local -> s3://": uploaded(str(local)),
        "rescale, s3:// -> s3://": uploaded(url),
        "rescale, download + local + upload": download_rescale_upload,
    }
    if baseline is not None:  # another checkout's gclip, in the same rounds
        found["rescale, local -> s3:// (baseline)"] = uploaded(str(local), baseline)
        found["rescale, s3:// -> s3:// (baseline)"] = uploaded(url, baseline)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="safetensors")
    parser.add_argument(
        "--baseline", metavar="PYTHON", help="also time the uploads of another checkout's gclip"
    )
    settings = parser.parse_args()

    import boto3

    server, endpoint = start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="gclip-bench")
        with tempfile.TemporaryDirectory(prefix="gclip-bench-") as folder:
            work = Path(folder)
            for fmt in settings.formats.split(","):
                local = work / f"dump{SUFFIXES[fmt]}"
                write_dump(local, parse_size(settings.size))
                client.upload_file(str(local), "gclip-bench", local.name)
                runs = cases("gclip-bench", local, work, settings.baseline)
                times: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
                for _ in range(settings.rounds):  # interleaved: every case in every round
                    for name, work_of in runs.items():
                        times[name].append(timed(work_of))
                        seconds, peak = times[name][-1]
                        print(f"{name}: {seconds:.2f} s, {peak / 1024:.0f} MiB", flush=True)
                report(fmt, local.stat().st_size, times)
                local.unlink()
    finally:
        server.terminate()
        server.wait()


def report(fmt: str, size: int, times: dict[str, list[tuple[float, int]]]) -> None:
    rounds = len(next(iter(times.values())))
    print(f"\n{fmt}, {size / (1 << 20):,.0f} MiB (median of {rounds} rounds)\n")
    print("| command | median wall (s) | vs local | all runs (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in times.items()}
    for name, seconds in medians.items():
        base = medians[f"{name.split(',')[0]}, local"]
        each = ", ".join(f"{t:.2f}" for t, _ in times[name])
        peak = max(rss for _, rss in times[name]) / 1024
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x | {each} | {peak:.0f} |")


if __name__ == "__main__":
    main()
