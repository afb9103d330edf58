"""A worker's fetch of https:// and s3:// references against the farm's policy: real TLS servers on
127.0.0.1 (a certificate made here, trusted through ``reference_ca_bundle``) and the real S3 server.
Nothing here leaves 127.0.0.x."""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from kleinfarm.shared.errors import (
    ReferenceImageError,
    ReferenceNotFoundError,
    ReferenceRefusedError,
    ReferenceTooLargeError,
)
from kleinfarm.shared.settings import FarmSettings
from kleinfarm.shared.storage import Storage
from kleinfarm.worker.https_fetch import is_public
from kleinfarm.worker.references import Reference, ReferenceFetcher

DRIP_S = 0.3
BIG = 5000
LIMIT = 1000


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


# -- a certificate authority and a server certificate for localhost, 127.0.0.1 and 127.0.0.2 -----


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    try:
        _with_cryptography(files)
    except ImportError:
        _with_openssl(files, folder)
    return files


def _with_cryptography(files: TlsFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None) -> x509.Builder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        certificate("kleinfarm test CA", ca_key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(*[False] * 5, True, True, False, False), critical=True)  # cert and CRL sign
        .sign(ca_key, hashes.SHA256())
    )
    hosts = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(f"127.0.0.{i}")) for i in (1, 2))]
    leaf = (
        certificate("localhost", key, ca)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    private = serialization.PrivateFormat.PKCS8
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, private, serialization.NoEncryption()))


def _with_openssl(files: TlsFiles, folder: Path) -> None:
    ca_key, csr, extensions = folder / "ca.key", folder / "leaf.csr", folder / "leaf.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\nauthorityKeyIdentifier=keyid\n"
    )
    commands = [
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", ca_key,
         "-out", files.ca, "-days", "1", "-subj", "/CN=kleinfarm test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", files.key,
         "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
         "-extfile", extensions, "-out", files.cert],
    ]  # fmt: skip
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


# -- an HTTPS server with one route per behaviour -------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        route = ROUTES.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location.format(port=self.server.server_address[1]))
        self.end_headers()

    def drip(self, head: bytes) -> None:
        """``head`` at once, then a byte every DRIP_S for about a minute (or until the client leaves)."""
        try:
            self.wfile.write(head)
            for _ in range(200):
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(DRIP_S)
        except OSError:
            return


ROUTES: dict[str, Callable[[Handler], None]] = {
    "/ok.png": lambda handler: handler.reply(PNG, len(PNG)),
    "/not-an-image.png": lambda handler: handler.reply(b"<html>nope</html>", 17),
    "/big": lambda handler: handler.reply(b"x" * BIG, BIG),
    "/big-unsized": lambda handler: handler.reply(b"x" * BIG),  # HTTP/1.0: the body ends when the server closes
    "/huge-declared": lambda handler: handler.drip(b"HTTP/1.0 200 OK\r\nContent-Length: 10000000000\r\n\r\n"),
    "/to-http": lambda handler: handler.redirect("http://127.0.0.1:{port}/ok.png"),
    "/to-ip": lambda handler: handler.redirect("https://127.0.0.1:{port}/ok.png"),
    "/to-other-ip": lambda handler: handler.redirect("https://127.0.0.2:{port}/ok.png"),
    "/to-ok": lambda handler: handler.redirect("/ok.png"),
    "/loop": lambda handler: handler.redirect("/loop"),
    "/drip-body": lambda handler: handler.drip(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    "/drip-head": lambda handler: handler.drip(b"HTTP/1.0 200 OK\r\nX-Slow: "),
}


class TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.context = context

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:  # the handshake in the connection's own thread: a client that fails it stops nothing else
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:
            return
        with tls:
            super().finish_request(tls, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def https_port(tls_files: TlsFiles) -> Iterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    server = TlsServer(context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture()
def fetcher(
    storage: Storage, settings: FarmSettings, tls_files: TlsFiles, tmp_path: Path
) -> Callable[..., ReferenceFetcher]:
    """A fetcher under the test settings, changed by keyword; the test CA is trusted unless told otherwise."""

    def make(**update: object) -> ReferenceFetcher:
        update = {"reference_ca_bundle": tls_files.ca, "cache_dir": tmp_path, **update}
        return ReferenceFetcher(storage, settings.model_copy(update=update))

    return make


def refusal(fetcher: ReferenceFetcher, url: str, error: type[Exception] = ReferenceRefusedError) -> str:
    with pytest.raises(error) as caught:
        fetcher.fetch(url)
    return str(caught.value)


# -- (a) addresses -----------------------------------------------------------------------------------


def test_a_loopback_reference_is_refused_by_default(fetcher: Callable[..., ReferenceFetcher], https_port: int) -> None:
    url = f"https://127.0.0.1:{https_port}/ok.png"
    assert refusal(fetcher(), url) == (
        f"reference {url} refused: 127.0.0.1 resolves to a non-public address; "
        "allow it with KLEINFARM_REFERENCE_ALLOW_HOSTS"
    )
    name = f"https://localhost:{https_port}/ok.png"
    assert "localhost resolves to a non-public address" in refusal(fetcher(), name)


@pytest.mark.parametrize(
    ("host", "allow"),
    [("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "10.0.0.0/8, 127.0.0.0/8"), ("localhost", "LOCALHOST")],
)
def test_a_host_or_network_on_the_allow_list_is_fetched(
    fetcher: Callable[..., ReferenceFetcher], https_port: int, host: str, allow: str
) -> None:
    reference = fetcher(reference_allow_hosts=allow).fetch(f"https://{host}:{https_port}/ok.png")
    assert isinstance(reference, Reference) and reference.image.size == (96, 96)


def test_the_host_is_resolved_once_and_that_address_is_the_one_connected_to(
    fetcher: Callable[..., ReferenceFetcher], https_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a second lookup would answer 127.0.0.2, where nothing listens."""
    real, lookups = socket.getaddrinfo, []

    def rebinding(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    reference = fetcher(reference_allow_hosts="127.0.0.0/8").fetch(f"https://localhost:{https_port}/ok.png")
    assert reference.image.size == (96, 96)
    assert lookups == ["localhost"]


# -- (b) redirects -----------------------------------------------------------------------------------


def test_a_redirect_to_http_is_refused(fetcher: Callable[..., ReferenceFetcher], https_port: int) -> None:
    url = f"https://127.0.0.1:{https_port}/to-http"
    assert refusal(fetcher(reference_allow_hosts="127.0.0.1"), url) == (
        f"reference {url} refused: 127.0.0.1 redirects to a non-https URL (http://127.0.0.1:{https_port}/ok.png)"
    )


def test_a_redirect_is_checked_like_the_first_request(
    fetcher: Callable[..., ReferenceFetcher], https_port: int
) -> None:
    """The allow-list names localhost, by name: its redirect to an address (the same server) is refused."""
    by_name = fetcher(reference_allow_hosts="localhost")
    assert by_name.fetch(f"https://localhost:{https_port}/to-ok").image.size == (96, 96)  # same host: fine
    assert "127.0.0.1 resolves to a non-public address" in refusal(by_name, f"https://localhost:{https_port}/to-ip")
    by_address = fetcher(reference_allow_hosts="127.0.0.1")
    assert by_address.fetch(f"https://127.0.0.1:{https_port}/to-ip").image.size == (96, 96)
    message = refusal(by_address, f"https://127.0.0.1:{https_port}/to-other-ip")
    assert "127.0.0.2 resolves to a non-public address" in message


def test_redirects_stop_after_five(fetcher: Callable[..., ReferenceFetcher], https_port: int) -> None:
    url = f"https://127.0.0.1:{https_port}/loop"
    assert (
        refusal(fetcher(reference_allow_hosts="127.0.0.1"), url)
        == f"reference {url} refused: it redirects more than 5 times"
    )


# -- (c) one deadline for the whole fetch ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "words"), [("/drip-body", "took longer than the 2 s deadline"), ("/drip-head", "no HTTPS answer")]
)
def test_a_server_dripping_bytes_is_cut_off_at_the_deadline(
    fetcher: Callable[..., ReferenceFetcher], https_port: int, path: str, words: str
) -> None:
    slow = fetcher(reference_allow_hosts="127.0.0.1", reference_fetch_deadline_s=2.0)
    started = time.monotonic()
    message = refusal(slow, f"https://127.0.0.1:{https_port}{path}", ReferenceNotFoundError)
    assert time.monotonic() - started < 3.0
    assert words in message


# -- (d) every connection failure reads the same ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """Accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture()
def resetting_port() -> Iterator[int]:
    """Accepts each connection and resets it at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_refused_silent_reset_and_untrusted_all_give_the_same_message(
    fetcher: Callable[..., ReferenceFetcher], https_port: int, silent_port: int, resetting_port: int
) -> None:
    """Otherwise a job's error would tell a submitter which ports answer: a port scanner."""
    trusting = fetcher(reference_allow_hosts="127.0.0.1", reference_fetch_deadline_s=1.0)
    untrusting = fetcher(reference_allow_hosts="127.0.0.1", reference_fetch_deadline_s=1.0, reference_ca_bundle=None)
    cases = [(trusting, free_port()), (trusting, silent_port), (trusting, resetting_port), (untrusting, https_port)]
    messages = set()
    for case_fetcher, port in cases:
        message = refusal(case_fetcher, f"https://127.0.0.1:{port}/ok.png", ReferenceNotFoundError)
        messages.add(message.replace(f":{port}/", ":PORT/"))
    assert messages == {
        "reference https://127.0.0.1:PORT/ok.png could not be fetched: no HTTPS answer from 127.0.0.1 "
        "(unreachable, refused, failed TLS or past the 1 s deadline)"
    }


# -- (e) bytes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big", "/big-unsized", "/huge-declared"])
def test_a_reference_over_the_byte_limit_is_refused(
    fetcher: Callable[..., ReferenceFetcher], https_port: int, path: str
) -> None:
    """A declared length over the limit is refused before any body is read (that one never comes)."""
    url = f"https://127.0.0.1:{https_port}{path}"
    small = fetcher(reference_allow_hosts="127.0.0.1", reference_max_bytes=LIMIT, reference_fetch_deadline_s=10.0)
    started = time.monotonic()
    assert refusal(small, url, ReferenceTooLargeError) == (
        f"reference {url} is over {LIMIT} bytes: the limit is {LIMIT} (KLEINFARM_REFERENCE_MAX_BYTES)"
    )
    assert time.monotonic() - started < 2.0


def test_a_missing_reference_is_named_and_no_credential_or_query_is_shown(
    fetcher: Callable[..., ReferenceFetcher], https_port: int
) -> None:
    url = f"https://reader:hunter2@127.0.0.1:{https_port}/missing.png?X-Amz-Signature=secret"
    message = refusal(fetcher(reference_allow_hosts="127.0.0.1"), url, ReferenceNotFoundError)
    assert message == f"reference https://127.0.0.1:{https_port}/missing.png?(redacted) does not exist (HTTP 404)"


def test_a_reference_that_is_not_an_image_is_named_without_its_signature(
    fetcher: Callable[..., ReferenceFetcher], https_port: int
) -> None:
    url = f"https://reader:hunter2@127.0.0.1:{https_port}/not-an-image.png?X-Amz-Signature=secret"
    message = refusal(fetcher(reference_allow_hosts="127.0.0.1"), url, ReferenceImageError)
    assert "is not an image" in message and "secret" not in message and "hunter2" not in message


def test_only_https_urls_are_fetched(fetcher: Callable[..., ReferenceFetcher]) -> None:
    assert "is not a valid https:// URL" in refusal(fetcher(), "https:///no-host.png", ReferenceImageError)


# -- (f) buckets -----------------------------------------------------------------------------------


def test_an_s3_reference_outside_the_allowed_buckets_is_refused(
    fetcher: Callable[..., ReferenceFetcher], storage: Storage, settings: FarmSettings
) -> None:
    storage.client.create_bucket(Bucket="someone-elses")
    storage.client.put_object(Bucket="someone-elses", Key="private.png", Body=PNG)
    storage.client.put_object(Bucket=settings.s3_bucket, Key="refs/own.png", Body=PNG)
    foreign, own = "s3://someone-elses/private.png", f"s3://{settings.s3_bucket}/refs/own.png"
    assert refusal(fetcher(), foreign) == (
        f"reference {foreign} refused: bucket someone-elses is not one references may be read from; "
        "allow it with KLEINFARM_REFERENCE_BUCKETS"
    )
    assert fetcher().fetch(own).image.size == (96, 96)  # the farm's own bucket, by default
    # Named buckets add to the farm's own, where the client uploads local references.
    both = fetcher(reference_buckets="someone-elses")
    assert both.fetch(foreign).image.size == (96, 96) and both.fetch(own).image.size == (96, 96)


# -- (g) which addresses are public -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("169.254.169.254", False),  # cloud metadata
        ("fd00:ec2::254", False),  # AWS metadata over IPv6
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # shared address space (carrier NAT)
        ("127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("192.0.0.8", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped: reaches 127.0.0.1
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("::ffff:8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_the_address_classifier(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public
