"""A real HTTP server on 127.0.0.1 for the tests of the OpenAI-compatible teacher and judge clients."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_body(self, code, payload: bytes, headers=None):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout under test)
            pass

    # Faults a real server or proxy can produce, for the clients' failure tests.
    def send_redirect(self, location: str, code: int = 307):
        self.send_body(code, b"", {"Location": location})

    def send_truncated(self, payload: bytes):
        """Promises the whole payload (Content-Length), sends half, then drops the connection."""
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_raw(self, data: bytes):
        """Bytes straight onto the socket, e.g. a garbage status line, then the connection closes."""
        self.close_connection = True
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_trickle(self, payload: bytes, gap_s: float):
        """A complete, valid response sent one byte every `gap_s` seconds (each read arrives well in time)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(gap_s)
        except (BrokenPipeError, ConnectionResetError):
            pass


class LocalServer:
    """Serves `handler` on a free port while in a `with` block; `url` is the `/v1` base of the endpoint."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
