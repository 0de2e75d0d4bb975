"""DICOM TLS (PS3.15 B.9, BCP 195) with dcmtk's echoscu and storescu as the scanners.

A test CA signs the node's certificate and a scanner's client certificate (openssl, in the test);
a second CA signs a client certificate the node must not trust. The node requires a client
certificate. An idle TCP client, a client stalled in its TLS handshake and a client that finished
its handshake but says nothing must not delay anyone else.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ingest_support import CT_IMAGE, image, ingest_node, tiny_model_package
from peers import LOOPBACK, PeerError, echoscu, ensure_tools, free_port, storescu

pytestmark = pytest.mark.peers


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _issue(folder: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={subject}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-sha256", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=Appliance test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _issue(folder, "node", "ca", "localhost",
           "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(folder, "scanner", "ca", "CT1", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue", "rogue-ca", "ROGUE", "extendedKeyUsage=clientAuth\n")
    return folder


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory, pki):
    ensure_tools("echoscu", "storescu")
    models = tmp_path_factory.mktemp("models")
    tiny_model_package(models)
    port = free_port()
    node = ingest_node(tmp_path_factory.mktemp("tls"), models, node="network_timeout = 20.0\n", extra=(
        f'[tls]\nenabled = true\nport = {port}\ncertificate = "{pki / "node.crt"}"\n'
        f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n'
        "require_client_certificate = true\n"))
    node.tls_port = port
    with node:
        yield node


def tls_args(pki: Path, client: str = "scanner") -> list[str]:
    return ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.crt"), "+cf", str(pki / "ca.crt")]


def test_echo_and_store_over_tls_with_dcmtk_store_the_instance_as_sent(tls_node, pki, tmp_path):
    path = image(tmp_path / "ct.dcm", rows=256, columns=256, modality="CT", sop_class=CT_IMAGE, signed=True,
                 series_uid=generate_uid(), study_uid=generate_uid(), rng=np.random.default_rng(1))
    echoscu(LOOPBACK, tls_node.tls_port, extra_args=tls_args(pki))
    storescu(path, LOOPBACK, tls_node.tls_port, extra_args=tls_args(pki))
    echoscu(LOOPBACK, tls_node.port)  # the plain port serves as before
    uid = pydicom.dcmread(path).SOPInstanceUID
    with sqlite3.connect(tls_node.data_dir / "index.sqlite") as db:
        (stored,) = db.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (uid,)).fetchone()
    original, kept = path.read_bytes(), (tls_node.data_dir / "spool" / stored).read_bytes()
    assert kept.endswith(original[original.index(b"\x08\x00\x16\x00"):])  # the data set, byte for byte


def test_a_client_without_a_certificate_from_the_trusted_ca_is_refused(tls_node, pki):
    with pytest.raises(PeerError):
        echoscu(LOOPBACK, tls_node.tls_port, extra_args=["+tla", "+cf", str(pki / "ca.crt")])
    with pytest.raises(PeerError):
        echoscu(LOOPBACK, tls_node.tls_port, extra_args=tls_args(pki, "rogue"))
    with pytest.raises(PeerError):  # plain DICOM on the TLS port
        echoscu(LOOPBACK, tls_node.tls_port)
    echoscu(LOOPBACK, tls_node.tls_port, extra_args=tls_args(pki))
    assert 'appliance_associations_rejected_total{reason="tls"}' in tls_node.metrics()


def _client_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(pki / "scanner.crt", pki / "scanner.key")
    return ctx


def test_tls_older_than_1_2_is_refused(tls_node, pki):
    ctx = _client_context(pki)
    try:
        with warnings.catch_warnings():  # asking for TLS 1.0/1.1 on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot even offer TLS 1.1: {e}")
    with socket.create_connection((LOOPBACK, tls_node.tls_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)
    ctx = _client_context(pki)
    with socket.create_connection((LOOPBACK, tls_node.tls_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            cipher, _, bits = tls.cipher()
            assert bits >= 128 and ("GCM" in cipher or "CHACHA20" in cipher)


def test_idle_tcp_and_tls_clients_do_not_delay_a_concurrent_tls_association(tls_node, pki):
    # A client that finished its handshake and then says nothing.
    silent = _client_context(pki).wrap_socket(socket.create_connection((LOOPBACK, tls_node.tls_port), timeout=30),
                                              server_hostname="localhost")
    # A client that connects and never starts a handshake.
    idle_tcp = socket.create_connection((LOOPBACK, tls_node.tls_port))
    # A client that stops half-way through its ClientHello.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = _client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    stalled = socket.create_connection((LOOPBACK, tls_node.tls_port))
    stalled.sendall(outgoing.read()[:40])
    time.sleep(0.3)
    started = time.monotonic()
    for _ in range(3):
        echoscu(LOOPBACK, tls_node.tls_port, extra_args=tls_args(pki))
    elapsed = time.monotonic() - started
    for s in (idle_tcp, stalled, silent):
        s.close()
    assert elapsed < 5.0, f"3 TLS echoes took {elapsed:.1f} s next to idle clients (network timeout 20 s)"
