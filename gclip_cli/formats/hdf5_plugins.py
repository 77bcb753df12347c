"""HDF5 filters that come as plugins (Blosc, Zstd, LZ4, Bitshuffle, ...): hdf5plugin's, loaded
when a file needs one, and the error that names what to install when a filter is missing.

HDF5 loads a filter it does not have built in from the directories in HDF5_PLUGIN_PATH;
hdf5plugin (``pip install 'gclip[hdf5plugin]'``) registers its own builds of the common ones
when it is imported.  It is imported only when some dataset of a file needs a filter HDF5 lacks
(importing it costs start-up), in the process that opened the file: a forked child, a worker of
a pool or of Dask alike.  Datasets with these filters are then read and written through HDF5.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module

import h5py

EXTRA = "gclip[hdf5plugin]"
INSTALL = f"pip install '{EXTRA}'"
NOT_INSTALLED = "hdf5plugin is not installed"

# The filters hdf5plugin provides (its FILTERS), by their registered ids, as their projects
# name them; known here without importing it, for the error when it is not installed.
HDF5PLUGIN_FILTERS = {
    307: "BZip2",
    32001: "Blosc",
    32004: "LZ4",
    32008: "Bitshuffle",
    32013: "ZFP",
    32015: "Zstandard",
    32017: "SZ",
    32018: "FCIDECOMP",
    32024: "SZ3",
    32026: "Blosc2",
    32028: "SPERR",
    32033: "HTJ2K",
}


def missing_filter(dataset: h5py.Dataset) -> tuple[int, str] | None:
    """The first filter of *dataset*'s pipeline that HDF5 cannot apply here: (id, the name the
    file gives it), or None."""
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(index)
        if not h5py.h5z.filter_avail(code):
            return code, name.decode("utf-8", "replace")
    return None


def load_hdf5plugin() -> str | None:
    """Import hdf5plugin, which registers its filters with HDF5; None when that worked, else why
    it did not."""
    try:
        import_module("hdf5plugin")
    except ModuleNotFoundError as exc:
        if exc.name != "hdf5plugin":  # one of its own imports is missing
            return f"hdf5plugin cannot be imported ({exc})"
        return NOT_INSTALLED
    except (ImportError, OSError) as exc:  # installed but broken, or its libraries do not load
        return f"hdf5plugin cannot be imported ({exc})"
    return None


def load_plugins_if_needed(datasets: Iterable[h5py.Dataset]) -> str | None:
    """Load hdf5plugin when some dataset needs a filter HDF5 lacks; what load_hdf5plugin()
    returned, or None when nothing was needed."""
    if any(missing_filter(dataset) for dataset in datasets):
        return load_hdf5plugin()
    return None


def unavailable_filter_message(name: str, code: int, stored_name: str, problem: str | None) -> str:
    """Why dataset *name* cannot be read: filter *code* is not available (*problem*: what
    load_hdf5plugin() said), and what provides it."""
    known = HDF5PLUGIN_FILTERS.get(code)
    label = known or stored_name.split(";")[0].strip()  # some names run on with a URL
    filter_text = f"HDF5 filter {code}" + (f" ({label})" if label else "")
    head = f"dataset {name!r} uses {filter_text}, which is not available"
    if known is None:
        return (
            f"{head}: no plugin for it is installed ({EXTRA} does not provide it; HDF5 loads "
            "filter plugins from the directories in HDF5_PLUGIN_PATH)"
        )
    if problem == NOT_INSTALLED:
        return f"{head}: {problem} ({INSTALL})"
    if problem is not None:
        return f"{head}: {problem}; reinstall: {INSTALL}"
    return f"{head}: the installed hdf5plugin does not provide it (pip install -U '{EXTRA}')"
