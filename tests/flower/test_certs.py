"""The certificate recipe: the coordinator makes the CA and the SuperLink's certificate; each
organisation makes its own node key pair and hands over only the public key."""

import runpy
import stat
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402

CERTS = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "flower_certs.py"))


def test_coordinator_and_organisation_each_make_only_their_own(tmp_path, capsys):
    CERTS["main"](["coordinator", str(tmp_path / "coord"), "--hosts", "127.0.0.1"])
    assert sorted(p.name for p in (tmp_path / "coord").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    capsys.readouterr()
    CERTS["main"](["node", str(tmp_path / "org"), "--name", "hospital"])
    printed = capsys.readouterr().out
    private, public = tmp_path / "org" / "hospital", tmp_path / "org" / "hospital.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    ours = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.read_bytes().strip() == ours and ours.decode() in printed  # the public key, handed over
    assert "PRIVATE" not in printed and private.read_text() not in printed
    before = private.read_bytes()
    with pytest.raises(SystemExit, match="not overwritten"):  # a second run never replaces a key
        CERTS["main"](["node", str(tmp_path / "org"), "--name", "hospital"])
    assert private.read_bytes() == before
