"""The ``data.pkl`` of a PyTorch checkpoint, read without torch and without running it.

``torch.save`` pickles the saved object with each tensor as a call of a rebuild function
(``torch._utils._rebuild_tensor_v2``) on a storage, an offset, a shape and strides; the storage is
a persistent id naming the archive member that holds its bytes.  The unpickler here resolves only
the globals torch's own ``weights_only=True`` loader allows for tensors and plain containers, to
stand-ins of its own that describe the tensors (TensorView) instead of making them; any other
global is refused before anything is called.  Containers come out as plain Python containers.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..strict_json import shown

MAX_DIMS = 64  # numpy's limit on an array's dimensions
MAX_PROTOCOL = 4  # torch.save writes 2 (pickle_protocol= may ask for more)
MAX_NESTING = 1000  # containers around a tensor (a state dict: 1, an optimizer's state: 3)
_MAX_EXTENT = 1 << 63  # dimensions, strides and offsets are signed 64-bit integers in torch

# torch dtype name -> (numpy dtype name, item size); numpy names for ml_dtypes' types
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("float64", 8),
    "float32": ("float32", 4),
    "float16": ("float16", 2),
    "bfloat16": ("bfloat16", 2),
    "float8_e4m3fn": ("float8_e4m3fn", 1),
    "float8_e5m2": ("float8_e5m2", 1),
    "float8_e4m3fnuz": ("float8_e4m3fnuz", 1),
    "float8_e5m2fnuz": ("float8_e5m2fnuz", 1),
    "float8_e8m0fnu": ("float8_e8m0fnu", 1),
    "int64": ("int64", 8),
    "int32": ("int32", 4),
    "int16": ("int16", 2),
    "int8": ("int8", 1),
    "uint8": ("uint8", 1),
    "uint16": ("uint16", 2),
    "uint32": ("uint32", 4),
    "uint64": ("uint64", 8),
    "bool": ("bool", 1),
    "complex64": ("complex64", 8),
    "complex128": ("complex128", 16),
}
# How torch.save names the storage classes of the dtypes it had before 2.0
_LEGACY_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class Refused(ValueError):
    """data.pkl asks for something gclip does not do (a global outside the allow-list, a
    rebuild call with arguments no torch.save writes): the message says what."""


@dataclass(frozen=True)
class StorageType:
    """A storage class named by the pickle (``torch FloatStorage``): the dtype of its items
    (``uint8`` for an untyped storage, whose tensors carry their own dtype)."""

    dtype: str


@dataclass(frozen=True)
class DType:
    """A torch dtype named by the pickle (``torch float8_e4m3fn``)."""

    name: str


@dataclass(frozen=True)
class Storage:
    """A storage: archive member ``data/<key>`` holding *numel* items of *dtype*."""

    key: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * TORCH_DTYPES[self.dtype][1]


@dataclass(frozen=True, eq=False)
class TensorView:
    """A tensor as torch rebuilds it: *shape* and *stride* (in items of *dtype*) over the items
    of *storage* from *offset* on.  *negated*: torch's negative bit (the values are the stored
    ones negated).  Compared by identity: a tensor saved twice is one object."""

    storage: Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    negated: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.dtype][1]


class _Marker:
    """A global resolved to a name only (``torch.Tensor``, ``torch.device``): calling it is
    refused, so a pickle can only name it."""

    def __init__(self, name: str) -> None:
        self.name = name


def load(data: bytes) -> object:
    """The object pickled in *data* (a checkpoint's data.pkl), tensors as TensorViews.

    Its opcodes are checked first (scanned, not run): only those of pickle protocols 0-4, and
    only allowed globals by name.  Raises Refused for an opcode, a global or a call outside
    what torch.save writes, and what pickle raises for a damaged pickle
    (pickle.UnpicklingError, EOFError, ValueError, ...)."""
    _check_opcodes(data)
    return _Unpickler(io.BytesIO(data), encoding="utf-8").load()


def _check_opcodes(data: bytes) -> None:
    """Refuse opcodes beyond protocol 4 (torch.save writes protocol 2; protocol 5's
    out-of-band buffers have no use here and upset CPython's unpickler on hostile input) and
    globals named outside the allow-list, before anything is unpickled."""
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.proto > MAX_PROTOCOL or (opcode.name == "PROTO" and argument > MAX_PROTOCOL):
            raise Refused(
                f"data.pkl uses the opcode {opcode.name} of pickle protocol "
                f"{max(opcode.proto, argument if opcode.name == 'PROTO' else 0)}, which "
                "torch.save does not write (refused; nothing was run)"
            )
        # CPython's unpickler makes its memo as long as the largest index put (8 bytes each,
        # zeroed): five bytes could ask for 32 GiB.  A pickler numbers its entries from 0.
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(argument) > len(data):
            raise Refused(f"data.pkl puts a value at memo index {argument}, beyond its size")
        if opcode.name in ("GLOBAL", "INST"):
            module, _, name = argument.partition(" ")
            if _allowed(module, name) is None:
                raise Refused(_foreign_global(module, name))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        found = _allowed(module, name)
        if found is None:
            raise Refused(_foreign_global(module, name))
        return found

    def persistent_load(self, pid: object) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"data.pkl has a persistent id {shown(pid)} that is not a storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, StorageType):
            raise Refused(f"storage {shown(key)} has the type {shown(kind)}, not a storage type")
        if not isinstance(key, str) or not _is_count(numel):
            raise Refused(f"storage {shown(key)} is described as {shown(pid)}")
        return Storage(key, kind.dtype, numel)


def _foreign_global(module: str, name: str) -> str:
    return (
        f"data.pkl names the global {shown(f'{module}.{name}')}, which is not one torch.save "
        "writes for tensors (refused; nothing was run)"
    )


def _allowed(module: str, name: str) -> object | None:
    """The stand-in for the global *module*.*name*, None when it is not allowed."""
    if (module, name) in _FUNCTIONS:
        return _FUNCTIONS[module, name]
    if module == "torch" and name in _LEGACY_STORAGES:
        return StorageType(_LEGACY_STORAGES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return StorageType("uint8")
    if module == "torch" and name in TORCH_DTYPES:
        return DType(name)
    if (module, name) in _MARKERS:
        return _Marker(f"{module}.{name}")
    return None


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_EXTENT


def _counts(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(_is_count(v) for v in value):
        raise Refused(f"a tensor's {what} {shown(value)} is not a tuple of counts")
    if len(value) > MAX_DIMS:
        raise Refused(f"a tensor has {len(value)} dimensions, more than the {MAX_DIMS} allowed")
    return value


def _negated(metadata: object) -> bool:
    """Whether torch's tensor *metadata* (``{"conj": bool, "neg": bool}``) sets the negative
    bit; the conjugate bit changes nothing in a real tensor, and complex ones are not scaled."""
    if metadata is None:
        return False
    if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
        raise Refused(f"a tensor's metadata {shown(metadata)} is not torch's conj/neg bits")
    if not all(type(v) is bool for v in metadata.values()):
        raise Refused(f"a tensor's metadata {shown(metadata)} is not torch's conj/neg bits")
    return metadata.get("neg", False)


def _view(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    dtype: str | None,
    metadata: object = None,
) -> TensorView:
    if not isinstance(storage, Storage):
        raise Refused(f"a tensor is rebuilt from {shown(storage)}, not from a storage")
    shape, stride = _counts(shape, "shape"), _counts(stride, "strides")
    if len(stride) != len(shape) or not _is_count(offset):
        raise Refused(f"a tensor of shape {shape} has strides {stride} and offset {offset!r}")
    return TensorView(storage, dtype or storage.dtype, offset, shape, stride, _negated(metadata))


def _rebuild_tensor(storage: object, offset: object, shape: object, stride: object) -> TensorView:
    return _view(storage, offset, shape, stride, None)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object = False,
    hooks: object = None,
    metadata: object = None,
) -> TensorView:
    return _view(storage, offset, shape, stride, None, metadata)


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    dtype: object,
    metadata: object = None,
) -> TensorView:
    """Dtypes newer than the typed storage classes (float8, uint16...): an untyped storage and
    the dtype apart."""
    if not isinstance(dtype, DType):
        raise Refused(f"a tensor's dtype {shown(dtype)} is not a torch dtype")
    if not isinstance(storage, Storage) or storage.dtype != "uint8":
        raise Refused("a tensor with its own dtype is rebuilt from a typed storage")
    return _view(storage, offset, shape, stride, dtype.name, metadata)


def _rebuild_parameter(
    data: object, requires_grad: object, hooks: object, *state: object
) -> object:
    """An nn.Parameter: its tensor (Python attributes set on it are dropped)."""
    if not isinstance(data, TensorView) or len(state) > 1:
        raise Refused(f"a parameter is rebuilt from {shown(data)}, not from a tensor")
    return data


def _rebuild_from_type_v2(func: object, kind: object, args: object, state: object) -> object:
    """A tensor with Python attributes (or a Parameter): rebuilt by an allowed function; the
    attributes are dropped."""
    if func not in _REBUILDERS or not isinstance(kind, _Marker) or not isinstance(args, tuple):
        raise Refused(f"data.pkl rebuilds a tensor of type {shown(getattr(kind, 'name', kind))}")
    return func(*args)


def _ordered_dict(*args: object) -> OrderedDict:
    """collections.OrderedDict, as torch.save writes it: empty, filled by SETITEMS."""
    if args:
        raise Refused("data.pkl calls OrderedDict with arguments")
    return OrderedDict()


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """_codecs.encode as protocol 2 pickles bytes: a str and 'latin1'."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("data.pkl calls _codecs.encode other than to make bytes")
    return text.encode("latin1")


def _plain(kind: type) -> Callable[..., object]:
    """A builtin container type, made from at most one iterable of already unpickled values."""

    def make(*args: object) -> object:
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, str, bytes))):
            raise Refused(f"data.pkl calls {kind.__name__} with {shown(args)}")
        return kind(*args)

    return make


def _size(*args: object) -> tuple[int, ...]:
    """torch.Size: a tuple of counts."""
    if len(args) != 1 or not isinstance(args[0], (list, tuple)):
        raise Refused(f"data.pkl calls torch.Size with {shown(args)}")
    return _counts(tuple(args[0]), "size")


_REBUILDERS = frozenset(
    {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}
)
_FUNCTIONS: dict[tuple[str, str], Callable[..., object]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _encode,
    # (pickle maps protocol 2's __builtin__ to builtins before it asks)
    ("builtins", "set"): _plain(set),
    ("builtins", "bytearray"): _plain(bytearray),
}
# Named, never called: the types _rebuild_from_type_v2 is given
_MARKERS = frozenset({("torch", "Tensor"), ("torch.nn.parameter", "Parameter")})


def allowed_globals() -> list[tuple[str, str]]:
    """Every (module, name) data.pkl may name: a subset of torch's weights_only allow-list."""
    return [
        *_FUNCTIONS,
        *(("torch", name) for name in _LEGACY_STORAGES),
        ("torch.storage", "UntypedStorage"),
        *(("torch", name) for name in TORCH_DTYPES),
        *_MARKERS,
    ]


def walk(root: object) -> Iterator[tuple[list[object], TensorView]]:
    """(path, tensor) for every tensor in the unpickled *root*: the keys and indexes that lead
    to it, in the saved order; a tensor reached twice is listed at each of its paths.

    Containers without tensors are not entered (an optimizer's param_groups may share one
    tuple of betas).  A container with tensors reached twice, which no torch.save of a state
    dict or an optimizer makes, is refused: a pickle can make a graph of shared containers
    whose paths grow exponentially.  So are tensors nested deeper than MAX_NESTING."""
    holding = _holding_tensors(root)
    seen: set[int] = set()
    stack: list[tuple[list[object], object]] = [([], root)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, TensorView):
            yield path, value
            continue
        if id(value) not in holding:
            continue
        if id(value) in seen:
            raise Refused(f"data.pkl holds the container at {_dotted(path)} twice")
        if len(path) >= MAX_NESTING:
            raise Refused(f"data.pkl nests tensors more than {MAX_NESTING} containers deep")
        seen.add(id(value))
        children = _children(value) or []
        stack.extend(([*path, key], child) for key, child in reversed(children))


def _holding_tensors(root: object) -> set[int]:
    """The ids of the containers in *root* that hold a tensor at some depth, each container
    looked into once (depth first, without recursion: a pickle may nest a million deep)."""
    holding: set[int] = set()
    entered: set[int] = set()
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        value, left = stack.pop()
        children = _children(value)
        if children is None:
            continue
        if left:  # every child has been looked into
            if any(isinstance(c, TensorView) or id(c) in holding for _, c in children):
                holding.add(id(value))
        elif id(value) not in entered:
            entered.add(id(value))
            stack.append((value, True))
            stack.extend((child, False) for _, child in children)
    return holding


def _children(value: object) -> list[tuple[object, object]] | None:
    """The (key, value) pairs inside a container; None for what is no container."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, (set, frozenset)) and any(isinstance(v, TensorView) for v in value):
        raise Refused("data.pkl holds a tensor in a set, where it has no name")
    return None


def _dotted(path: list[object]) -> str:
    return shown(".".join(map(str, path))) if path else "the top"
