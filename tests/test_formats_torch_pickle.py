"""The restricted unpickler of data.pkl: what it resolves, what it refuses, and that refusing
runs nothing."""

from __future__ import annotations

import io
import pickle
import pickletools

import pytest

from gclip_cli.formats import torch_pickle
from gclip_cli.formats.torch_pickle import Refused, Storage, TensorView

torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")


def test_it_allows_nothing_torch_weights_only_refuses():
    from torch._weights_only_unpickler import _get_allowed_globals

    torch_allows = set(_get_allowed_globals())
    ours = {f"{module}.{name}" for module, name in torch_pickle.allowed_globals()}
    assert ours - torch_allows == set()
    assert "torch._utils._rebuild_tensor_v2" in ours and "torch.FloatStorage" in ours


def test_a_state_dict_as_torch_saves_it_becomes_views(tmp_path):
    import zipfile

    weight = torch.arange(6.0).reshape(2, 3)
    torch.save({"w": weight, "w2": weight, "s": weight[1], "n": 3, "b": b"raw"}, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as archive:
        root = torch_pickle.load(archive.read("a/data.pkl"))
    assert root["w"] is root["w2"] and isinstance(root["w"], TensorView)
    assert root["w"].storage == Storage("0", "float32", 6)
    assert (root["w"].shape, root["w"].stride, root["w"].offset) == ((2, 3), (3, 1), 0)
    assert (root["s"].shape, root["s"].offset) == ((3,), 3)
    assert root["n"] == 3 and root["b"] == b"raw"
    assert [(p, v.offset) for p, v in torch_pickle.walk(root)] == [
        (["w"], 0),
        (["w2"], 0),
        (["s"], 3),
    ]


def opcodes(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


@pytest.mark.parametrize(
    "data",
    [
        opcodes(b"cos\nsystem\n", b"X\x04\x00\x00\x00true", b"\x85R"),  # GLOBAL + REDUCE
        opcodes(b"cbuiltins\neval\n"),
        opcodes(b"cbuiltins\ngetattr\n"),
        opcodes(b"c__builtin__\nexec\n"),
        opcodes(b"(X\x04\x00\x00\x00trueios\nsystem\n"),  # INST
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.",  # STACK_GLOBAL
        opcodes(b"ctorch\nload\n"),
        opcodes(b"ctorch._utils\n_rebuild_qtensor\n"),
        opcodes(b"ctorch.nn.modules.linear\nLinear\n"),
        opcodes(b"cnumpy.core.multiarray\n_reconstruct\n"),
        opcodes(b"c__main__\nEvil\n"),
    ],
    ids=[
        "os.system",
        "eval",
        "getattr",
        "exec",
        "inst",
        "stack-global",
        "torch.load",
        "qtensor",
        "module",
        "numpy",
        "main",
    ],
)
def test_globals_outside_the_allow_list_are_refused_before_anything_runs(data):
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle
    with pytest.raises(Refused, match="nothing was run"):
        torch_pickle.load(data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (opcodes(b"X\x01\x00\x00\x00xQ"), Refused),  # BINPERSID of a str, not a storage tuple
        (opcodes(b"P0\n"), Refused),  # PERSID of protocol 0: a string, not a storage tuple
        (opcodes(b"ctorch\nFloatStorage\n)R"), TypeError),  # a storage type is never called
        (opcodes(b"ctorch\nFloatStorage\n)\x81"), pickle.UnpicklingError),  # nor made (NEWOBJ)
        (opcodes(b"ctorch\nTensor\n)R"), TypeError),  # a marker is never called
        (opcodes(b"ccollections\nOrderedDict\n(K\x01tR"), Refused),  # only empty
        (opcodes(b"ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00)))tR"), Refused),
        (opcodes(b"c_codecs\nencode\n(X\x01\x00\x00\x00xX\x04\x00\x00\x00utf7tR"), Refused),
    ],
)
def test_allowed_names_do_only_what_torch_save_needs(data, error):
    with pytest.raises(error):
        torch_pickle.load(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x05\x96\x01\x00\x00\x00\x00\x00\x00\x00x.", "protocol 5"),  # BYTEARRAY8
        (b"\x80\x02\x98.", "protocol 5"),  # READONLY_BUFFER
        (b"\x80\x05N.", "protocol 5"),
        (b"\x80\x02Nr\xff\xff\xff\x7f.", "memo index"),  # a 16 GiB memo for 8 bytes
    ],
    ids=["bytearray8", "buffer", "proto-5", "memo-bomb"],
)
def test_opcodes_torch_save_does_not_write_are_refused_unread(data, message):
    with pytest.raises(Refused, match=message):
        torch_pickle.load(data)


def test_build_on_a_stand_in_sets_no_code(tmp_path):
    # BUILD with a __setstate__ key: a dict's attribute, never a method that runs
    data = opcodes(b"ccollections\nOrderedDict\n)R}X\x0c\x00\x00\x00__setstate__K\x01sb")
    built = torch_pickle.load(data)
    assert dict(built) == {} and built.__dict__ == {"__setstate__": 1}
