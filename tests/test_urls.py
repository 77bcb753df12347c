"""URLs (urls.py): storage options, the file system of a URL and its missing backend, and
errors without secrets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gclip_cli import urls
from gclip_cli.errors import InputError, UsageError
from gclip_cli.options import Options

SECRET = "gclip-test-secret-Zq8v"  # must never be printed


def test_storage_options_read_json_values_and_strings():
    found = urls.parse_storage_options(["anon=true", "n=3", 'c={"a": 1}', "endpoint=http://x"])
    assert found == {"anon": True, "n": 3, "c": {"a": 1}, "endpoint": "http://x"}


def test_a_malformed_storage_option_is_refused_without_its_value():
    with pytest.raises(UsageError) as caught:
        Options(storage_options=("no-equals-sign-" + SECRET,))
    assert SECRET not in str(caught.value)


def test_options_never_show_storage_options():
    assert SECRET not in repr(Options(storage_options=(f"secret={SECRET}",)))


def test_secrets_are_blanked_out_of_backend_messages(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage = {"client_kwargs": {"aws_session_token": "tok-" + SECRET[::-1]}}
    with (
        pytest.raises(InputError) as caught,
        urls.remote_errors(InputError, "s3://b/k", storage, "cannot read"),
    ):
        raise RuntimeError(f"signature {SECRET} and token tok-{SECRET[::-1]} refused")
    assert SECRET not in str(caught.value) and SECRET[::-1] not in str(caught.value)
    assert "***" in str(caught.value)


def test_user_and_password_in_a_url_are_not_shown():
    assert urls.shown_url("https://me:pw@host/x.npz") == "https://host/x.npz"


def test_a_missing_backend_names_its_extra():
    code = (
        "import sys; sys.modules['gcsfs'] = None; "
        "sys.argv = ['gclip', 'inspect', 'gs://bucket/g.safetensors']; "
        "from gclip_cli.__main__ import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "gs:// URLs need gclip[gcs]: pip install 'gclip[gcs]'" in done.stderr
