"""Write a seeded gradient dump with GPT-2-medium shapes, of about any size, in any format.

    python benchmarks/make_dump.py /tmp/dump.safetensors --size 1G
    python benchmarks/make_dump.py /tmp/dump.npz --size 4G --compressed

The size is reached by the number of transformer blocks (GPT-2 medium has 24: 1.32 GiB in
float32).  Only one tensor is in memory at a time, so dumps larger than memory can be made.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

VOCAB, CONTEXT, WIDTH = 50257, 1024, 1024
BLOCK_SHAPES = {
    "ln_1.weight": (WIDTH,),
    "ln_1.bias": (WIDTH,),
    "attn.c_attn.weight": (WIDTH, 3 * WIDTH),
    "attn.c_attn.bias": (3 * WIDTH,),
    "attn.c_proj.weight": (WIDTH, WIDTH),
    "attn.c_proj.bias": (WIDTH,),
    "ln_2.weight": (WIDTH,),
    "ln_2.bias": (WIDTH,),
    "mlp.c_fc.weight": (WIDTH, 4 * WIDTH),
    "mlp.c_fc.bias": (4 * WIDTH,),
    "mlp.c_proj.weight": (4 * WIDTH, WIDTH),
    "mlp.c_proj.bias": (WIDTH,),
}
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def gpt2_shapes(size_bytes: int, itemsize: int = 4) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a GPT-2-medium-like model of about *size_bytes*."""
    embeddings = {"wte.weight": (VOCAB, WIDTH), "wpe.weight": (CONTEXT, WIDTH)}
    fixed = sum(np.prod(s) for s in embeddings.values()) * itemsize
    per_block = sum(np.prod(s) for s in BLOCK_SHAPES.values()) * itemsize
    blocks = max(1, round((size_bytes - fixed) / per_block))
    shapes = dict(embeddings)
    for b in range(blocks):
        shapes |= {f"h.{b}.{name}": shape for name, shape in BLOCK_SHAPES.items()}
    return shapes | {"ln_f.weight": (WIDTH,), "ln_f.bias": (WIDTH,)}


def tensors(shapes: dict[str, tuple[int, ...]], dtype: str, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for shape in shapes.values():
        yield (rng.standard_normal(shape, dtype=np.float32) * 1e-3).astype(dtype)


def write_safetensors(path: Path, shapes: dict, dtype: str, seed: int) -> None:
    code = {"float32": "F32", "float64": "F64", "float16": "F16"}[dtype]
    itemsize = np.dtype(dtype).itemsize
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for values in tensors(shapes, dtype, seed):
            f.write(values.tobytes())


def write_npz(path: Path, shapes: dict, dtype: str, seed: int, compressed: bool) -> None:
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, values in zip(shapes, tensors(shapes, dtype, seed), strict=True):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, np.lib.format.header_data_from_array_1_0(values)
            )
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                member.write(header.getvalue())
                member.write(values.tobytes())


def write_hdf5(path: Path, shapes: dict, dtype: str, seed: int, compressed: bool) -> None:
    options = {"compression": "gzip", "chunks": True} if compressed else {}
    with h5py.File(path, "w") as f:
        for name, values in zip(shapes, tensors(shapes, dtype, seed), strict=True):
            f.create_dataset(name, data=values, **options)


def write_dump(
    path: Path, size_bytes: int, dtype: str = "float32", seed: int = 0, compressed: bool = False
) -> None:
    shapes = gpt2_shapes(size_bytes, np.dtype(dtype).itemsize)
    if path.suffix == ".safetensors":
        write_safetensors(path, shapes, dtype, seed)
    elif path.suffix == ".npz":
        write_npz(path, shapes, dtype, seed, compressed)
    elif path.suffix in (".h5", ".hdf5"):
        write_hdf5(path, shapes, dtype, seed, compressed)
    else:
        raise SystemExit(f"{path}: use a .safetensors, .npz or .h5 name")


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text[-1] in UNITS else ""
    return int(float(text.removesuffix(unit)) * UNITS[unit])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", default="1G", help="approximate size, e.g. 256M, 1G, 4G")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compressed", action="store_true", help="deflate (npz) or gzip (HDF5)")
    args = parser.parse_args()
    write_dump(args.path, parse_size(args.size), args.dtype, args.seed, args.compressed)
    print(f"{args.path}: {args.path.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
