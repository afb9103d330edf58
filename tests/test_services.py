"""The local stand-ins start on a free port even when another process takes the probed one first."""

from __future__ import annotations

import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

from kleinfarm.producer.localfarm.services import RedisServer, S3Server, listens_on


class Answers(BaseHTTPRequestHandler):
    """Another program's web server: it answers anything with 200."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_redis_server_whose_port_was_taken_starts_on_another() -> None:
    squatter = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    taken = squatter.server_address[1]
    try:
        server = RedisServer()
        server.port = taken  # what free_port gave, then another process bound it
        with server:
            assert server.port != taken and server.process is not None
            assert listens_on(server.process.pid, server.port)
            assert redis.Redis.from_url(server.url).ping()
    finally:
        squatter.server_close()


def test_an_s3_server_is_not_fooled_by_another_server_answering_on_its_port() -> None:
    squatter = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    taken = squatter.server_address[1]
    try:
        server = S3Server()
        server.port = taken
        with server:
            assert server.port != taken and server.process is not None
            assert listens_on(server.process.pid, server.port)
            with urllib.request.urlopen(server.url + "/", timeout=5) as answer:
                assert b"ListAllMyBucketsResult" in answer.read()
    finally:
        squatter.shutdown()
        squatter.server_close()
