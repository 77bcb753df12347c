"""The README's examples, run as written: its ```sh blocks with bash, the `$ gclip ...` lines of
its ```console blocks (their output compared with what the README shows) and its ```python
blocks, each in a fresh directory holding the files they name, made from sample_data/.

Blocks that install (`pip install`) are not run: they would install into this environment."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SAMPLE = "lstm_grads_step12"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TROUBLE = re.compile(r"error|traceback|not found|no such file|cannot", re.IGNORECASE)


def readme_blocks(language: str) -> list[pytest.param]:
    """The README's blocks in *language*, each with the line it starts on as its id."""
    text = README.read_text()
    return [
        pytest.param(match[2], id=f"line {text.count(chr(10), 0, match.start()) + 1}")
        for match in BLOCK.finditer(text)
        if match[1] == language
    ]


def prepare(directory: Path) -> None:
    """The files the examples name: the samples, copies of them under the names the examples
    give, a run's dumps (one over the norm, one within) and a checkpoint in two shards."""
    shutil.copytree(ROOT / "sample_data", directory / "sample_data")
    for suffix in (".safetensors", ".h5", ".npz"):
        shutil.copy(ROOT / "sample_data" / f"{SAMPLE}{suffix}", directory / f"grads{suffix}")
    tensors = load_file(ROOT / "sample_data" / f"{SAMPLE}.safetensors")
    (directory / "dumps").mkdir()
    save_file(tensors, directory / "dumps" / "step_12.safetensors")
    small = {name: values * np.float32(0.01) for name, values in tensors.items()}
    save_file(small, directory / "dumps" / "step_13.safetensors")
    for checkpoint in ("checkpoint", "ckpt"):
        write_sharded(directory / checkpoint, tensors)


def write_sharded(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    """Two safetensors shards and their model.safetensors.index.json, as save_pretrained
    writes them."""
    directory.mkdir()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, directory / shard)
    index = {
        "metadata": {"total_size": sum(values.nbytes for values in tensors.values())},
        "weight_map": {key: shard for shard, keys in shards.items() for key in keys},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    prepare(tmp_path)
    return tmp_path


@pytest.fixture
def shell_env() -> dict[str, str]:
    """`gclip` on PATH from this environment; tables at their full width, as the README shows
    them (a wide terminal); no colour."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "gclip").exists():
        pytest.skip(f"no gclip script beside {sys.executable} (pip install -e . installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GCLIP_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "COLUMNS": "200"}


def skip_without_jq(block: str) -> None:
    if re.search(r"\bjq\b", block) and shutil.which("jq") is None:
        pytest.skip("jq is not installed (the block pipes JSON into it)")


@pytest.mark.parametrize("block", readme_blocks("sh"))
def test_shell_examples_run_as_written(block, workdir, shell_env):
    if "pip install" in block:
        pytest.skip("installs packages: not run by the tests")
    skip_without_jq(block)
    proc = subprocess.run(
        ["bash", "-c", block], cwd=workdir, env=shell_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    # stderr has the rescale summaries, and would have every error of gclip, bash or jq
    assert not TROUBLE.search(proc.stderr), proc.stderr


def console_sessions(block: str) -> list[tuple[str, str]]:
    """(command, the output shown after it) for each `$ ` line of a console block."""
    sessions: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            sessions.append((line[2:], []))
        elif sessions:
            sessions[-1][1].append(line)
    return [(command, "\n".join(shown).rstrip("\n")) for command, shown in sessions]


@pytest.mark.parametrize("block", readme_blocks("console"))
def test_console_examples_print_what_the_readme_shows(block, workdir, shell_env):
    sessions = console_sessions(block)
    assert sessions, "a console block without a `$ ` command"
    for command, shown in sessions:
        skip_without_jq(command)
        proc = subprocess.run(  # stdout and stderr interleaved, as on a terminal
            ["bash", "-c", command],
            cwd=workdir,
            env=shell_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        printed = "\n".join(line.rstrip() for line in proc.stdout.splitlines()).rstrip("\n")
        assert printed == shown, f"$ {command}"


@pytest.mark.parametrize("block", readme_blocks("python"))
def test_python_examples_run_as_written(block, workdir):
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=workdir, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_the_examples_are_found():
    """The parsing above sees the README's blocks (else the tests would pass on nothing)."""
    assert len(readme_blocks("sh")) >= 3
    assert len(readme_blocks("console")) >= 2
    assert len(readme_blocks("python")) >= 1


def test_every_file_the_readme_names_is_in_the_repository():
    """Source files and documents the README cites exist: at the path given, or as a module of
    gclip_cli/, gclip_cli/formats/ or gclip_cli/render/ (the layout names modules by their file
    names)."""
    named = set(re.findall(r"[\w./-]+\.(?:md|py|c)\b", README.read_text()))
    places = (
        ROOT,
        ROOT / "gclip_cli",
        ROOT / "gclip_cli" / "formats",
        ROOT / "gclip_cli" / "render",
    )
    missing = sorted(name for name in named if not any((p / name).is_file() for p in places))
    assert missing == []
