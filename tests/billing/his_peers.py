"""Stand-ins for the HIS on loopback: an MLLP server that answers DFT messages with a
scripted ACK (AA, AE with an ERR segment, or nothing at all) and an HTTP server that
answers charge POSTs with scripted status codes. Both record what they received."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


@dataclass
class Script:
    """Answers given in turn; the last one repeats."""

    answers: list[Any]
    received: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, message: Any) -> Any:
        with self.lock:
            self.received.append(message)
            index = min(len(self.received), len(self.answers)) - 1
            return self.answers[index]


def ack_for(text: str, code: str) -> bytes:
    """An original-mode ACK to ``text`` (MSA-2 its MSH-10); AE carries an ERR segment."""
    message = hl7.parse(text)
    control_id = str(message.segment("MSH")[10])
    segments = [
        "MSH|^~\\&|HIS||CLOUDFILM||20261128093001||ACK^P03^ACK|A" + control_id + "|P|2.5.1",
        f"MSA|{code}|{control_id}",
    ]
    if code != "AA":
        segments.append("ERR||FT1^1^7|103^Table value not found^HL70357|E||||收费项目不存在")
    return SB + ("\r".join(segments) + "\r").encode("utf-8") + EB + CR


@contextmanager
def mllp_his(answers: list[str]) -> Iterator[tuple[int, Script]]:
    """An MLLP server on a free loopback port; each answer is ``AA``, ``AE`` or
    ``silent`` (the message is read and never answered)."""
    script = Script(list(answers))

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            buffer = b""
            self.request.settimeout(10)
            while True:
                try:
                    chunk = self.request.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while EB + CR in buffer:
                    frame, buffer = buffer.split(EB + CR, 1)
                    text = frame.lstrip(SB).decode("utf-8")
                    answer = script.next(text)
                    if answer != "silent":
                        self.request.sendall(ack_for(text, answer))

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], script
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def http_his(statuses: list[int]) -> Iterator[tuple[str, Script]]:
    """An HTTP server taking POST /charges; answers the scripted status codes and records
    (headers, JSON body) of each request."""
    script = Script(list(statuses))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            status = script.next({"path": self.path, "headers": dict(self.headers),
                                  "body": body})  # fmt: skip
            payload = json.dumps({"ok": status < 300, "message": "科室编码错误"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/charges", script
    finally:
        server.shutdown()
        server.server_close()
