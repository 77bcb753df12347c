"""Time gclip on an object in a local S3 server (moto) against the same file on disk and against
downloading it first (boto3's download_file, as ``aws s3 cp`` does) then running locally.

    python benchmarks/remote.py --size 1G                  # needs gclip[remote-test]
    python benchmarks/remote.py --rounds 1 --formats npz   # a quick check that it runs

(make_dump.py's smallest dump, GPT-2's embeddings and one block, is about 250 MiB.)  moto
keeps objects in memory and serves a ranged GET slowly (it is a test server): figures against
a real store will favour ranged reads more than these do.

For each format, each round times, one after the other: ``inspect`` and ``rescale`` of the
file on disk; of the object (``s3://``, output uploaded); and download + local run (+ upload
for rescale, with boto3's upload_file).  Prints the median seconds and each ratio to the
local run.  The server runs on 127.0.0.1 on a free port, started and stopped here.
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


def gclip(*args: str) -> None:
    command = [sys.executable, "-m", "gclip_cli", *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


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


def cases(client, bucket: str, local: Path, work: Path) -> dict[str, Callable[[], None]]:
    key = local.name
    url = f"s3://{bucket}/{key}"
    copy = work / f"copy{local.suffix}"
    out = work / f"out{local.suffix}"

    def download_then(*args: str) -> None:
        client.download_file(bucket, key, str(copy))
        gclip(*args)

    def download_rescale_upload() -> None:
        download_then("rescale", str(copy), str(out), "--max-norm", "1")
        client.upload_file(str(out), bucket, f"out-copied{local.suffix}")

    return {
        "inspect, local": lambda: gclip("inspect", str(local)),
        "inspect, s3://": lambda: gclip("inspect", url),
        "inspect, download + local": lambda: download_then("inspect", str(copy)),
        "rescale, local": lambda: gclip("rescale", str(local), str(out), "--max-norm", "1"),
        "rescale, s3:// -> s3://": lambda: gclip(
            "rescale", url, f"s3://{bucket}/out{local.suffix}", "--max-norm", "1"
        ),
        "rescale, download + local + upload": download_rescale_upload,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="safetensors,npz,hdf5")
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
                runs = cases(client, "gclip-bench", local, work)
                times = {name: [] for name in runs}
                for _ in range(settings.rounds):
                    for name, work_of in runs.items():
                        times[name].append(timed(work_of))
                report(fmt, local.stat().st_size, times)
    finally:
        server.terminate()
        server.wait()


def report(fmt: str, size: int, times: dict[str, list[float]]) -> None:
    print(f"\n{fmt}, {size / (1 << 20):,.0f} MiB (median of {len(next(iter(times.values())))})")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        base = medians[f"{name.split(',')[0]}, local"]
        print(f"  {name:<38} {seconds:7.2f} s  x{seconds / base:5.2f}")


if __name__ == "__main__":
    main()
