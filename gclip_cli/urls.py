"""URLs (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``, ``memory://``, ...): what
names one, the fsspec file system that serves it (its backend an optional extra, imported only
when a URL is given), storage options, and backend errors as one line with secrets blanked
out.  What is done with them: remote.py (inputs and outputs), formats/ranged.py (reads by
ranges).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import GclipError, InputError, UsageError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The extra that brings each protocol's backend (fsspec itself comes with every extra).
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
    "hf": "hf",
    "http": "http",
    "https": "http",
}
READ_ONLY = frozenset({"http", "https"})
# Environment variables whose values are secrets: never in a message, even one a backend wrote.
_SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "HF_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
_SHORTEST_SECRET = 4  # shorter values (true, 1, ...) would blank out ordinary words
# Storage options whose values are secrets (s3fs's key, secret and token; account keys, SAS
# tokens, passwords), by their key; an endpoint's URL is shown.
_SECRET_KEY = re.compile(r"secret|token|key|password|passwd|credential|sas|signature|connection")


def is_url(name: object) -> bool:
    """Whether *name* is a URL (``scheme://...``) rather than a local path."""
    return isinstance(name, str) and _URL.match(name) is not None


def local_path(name: str) -> str:
    """*name* with a ``file://`` URL made a plain path (read as any local file)."""
    return name[len("file://") :] if name.startswith("file://") else name


def is_remote(name: object) -> bool:
    """Whether *name* is a URL that gclip reaches through fsspec (not ``file://``)."""
    return is_url(name) and not str(name).startswith("file://")


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec storage options: a VALUE that parses as JSON (a number,
    true, an object) is that value, any other is a string.  A message never repeats a VALUE:
    it may be a secret."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(None, "--storage-option takes KEY=VALUE (a KEY, '=', its value)")
        try:
            found[key.strip()] = json.loads(value)
        except ValueError:
            found[key.strip()] = value
    return found


@dataclass(frozen=True)
class Remote:
    """An object (or a prefix) that a URL names, on its file system."""

    url: str
    fs: Any = field(repr=False)
    path: str  # as the file system names it (``bucket/key``)

    @property
    def protocol(self) -> str:
        return protocol_of(self.url)

    def child(self, name: str) -> Remote:
        """The object *name* (a relative path) under this prefix."""
        return Remote(f"{self.url.rstrip('/')}/{name}", self.fs, posixpath.join(self.path, name))


def protocol_of(url: str) -> str:
    found = _URL.match(url)
    return found.group(1).lower() if found else ""


def open_remote(url: str, storage: Mapping[str, Any]) -> Remote:
    """The file system that serves *url* (its backend imported now), with *storage* options;
    a missing backend is a usage error naming the extra that brings it."""
    protocol = protocol_of(url)
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(None, _install_hint(protocol)) from None
    with _quiet_secrets(storage):
        try:
            fs, path = url_to_fs(url, **storage)
        except ImportError:
            raise UsageError(None, _install_hint(protocol)) from None
        except ValueError as exc:
            if "not known" in str(exc):
                raise UsageError(None, f"{protocol}:// URLs: no such protocol in fsspec") from None
            raise UsageError(None, f"{shown_url(url)}: {exc}") from None
        except TypeError as exc:
            raise UsageError(None, f"--storage-option: {exc}") from None
    return Remote(url, fs, path)


def _install_hint(protocol: str) -> str:
    extra = EXTRAS.get(protocol, "remote")
    return f"{protocol}:// URLs need gclip[{extra}]: pip install 'gclip[{extra}]'"


def shown_url(url: str) -> str:
    """*url* without the user name and password some URLs carry (``https://u:p@host/``)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


# --- errors --------------------------------------------------------------------------------


@contextmanager
def _quiet_secrets(storage: Mapping[str, Any]) -> Iterator[None]:
    """GclipErrors raised inside with every secret (storage option values, the standard
    credential variables) blanked out of their message."""
    try:
        yield
    except GclipError as exc:
        message = _scrubbed(exc.message, storage)
        if message == exc.message:
            raise
        raise type(exc)(exc.path, message) from None


def _scrubbed(text: str, storage: Mapping[str, Any]) -> str:
    secrets = [v if isinstance(v, str) else json.dumps(v) for v in _secret_values(storage)]
    secrets += [os.environ.get(name, "") for name in _SECRET_VARIABLES]
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= _SHORTEST_SECRET:
            text = text.replace(secret, "***")
    return text


def _secret_values(options: Mapping[str, Any]) -> Iterator[object]:
    """The values of *options* (nested ones too) whose key names a secret."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _secret_values(value)
        elif _SECRET_KEY.search(str(key).lower()):
            yield value


@contextmanager
def remote_errors(
    kind: type[GclipError], url: str, storage: Mapping[str, Any], doing: str
) -> Iterator[None]:
    """A failure of the backend (after its own retries) as one line of *kind* (InputError:
    exit 3; OutputError: exit 5) naming *url*, secrets blanked out."""
    with _quiet_secrets(storage):
        try:
            yield
        except GclipError:
            raise
        except FileNotFoundError as exc:
            if kind is InputError:
                raise kind(shown_url(url), "no such object") from None
            raise kind(shown_url(url), f"{doing}: {_one_line(exc)}") from None
        except PermissionError as exc:
            raise kind(shown_url(url), f"{doing}: permission denied ({_one_line(exc)})") from None
        except Exception as exc:  # the backends raise their own kinds (botocore, aiohttp)
            raise kind(shown_url(url), f"{doing}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else f"{text[:300]}..."


def version_of(remote: Remote) -> str:
    """What changes when the object is replaced: its ETag where the store has one, else its
    last change, with its size (asked afresh, past fsspec's cache of listings)."""
    remote.fs.invalidate_cache(remote.path)
    info = remote.fs.info(remote.path)
    keys = ("ETag", "etag", "VersionId", "LastModified", "last_modified", "mtime", "created")
    stamp = next((str(info[k]) for k in keys if info.get(k) is not None), "")
    return f"{stamp}/{info.get('size')}"
