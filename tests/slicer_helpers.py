"""Helpers of the SlicerHLIP tests: the module's plain-Python layer on sys.path, a CMake reader
for the structure tests, small studies, and loopback stand-ins for answers a real HLIP server
never gives (an HTML page at a wrong address, a socket that never answers)."""
from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLICER_MODULE = REPO / "SlicerHLIP"
if str(SLICER_MODULE) not in sys.path:  # as Slicer does: the module's folder is on the path
    sys.path.insert(0, str(SLICER_MODULE))


# -- CMake ------------------------------------------------------------------------------------------


def cmake_commands(text: str) -> list:
    """CMake commands as (name, [arguments]); quoted arguments unquoted, comments dropped."""
    out, i, n = [], 0, len(text)

    def skip(i):
        while i < n:
            if text[i].isspace():
                i += 1
            elif text[i] == "#":
                while i < n and text[i] != "\n":
                    i += 1
            else:
                break
        return i

    while True:
        i = skip(i)
        if i >= n:
            return out
        start = i
        while i < n and (text[i].isalnum() or text[i] == "_"):
            i += 1
        name = text[start:i]
        i = skip(i)
        if not name or i >= n or text[i] != "(":
            raise ValueError(f"cannot read CMake near {text[start:start + 40]!r}")
        i += 1
        args, depth = [], 1
        while True:
            i = skip(i)
            if i >= n:
                raise ValueError(f"unclosed CMake command {name}")
            c = text[i]
            if c == ")":
                depth -= 1
                i += 1
                if depth == 0:
                    break
            elif c == "(":
                depth += 1
                i += 1
            elif c == '"':
                j, value = i + 1, []
                while text[j] != '"':
                    if text[j] == "\\":
                        value.append(text[j + 1])
                        j += 2
                    else:
                        value.append(text[j])
                        j += 1
                args.append("".join(value))
                i = j + 1
            else:
                j = i
                while j < n and not text[j].isspace() and text[j] not in "()#":
                    j += 1
                args.append(text[i:j])
                i = j
        out.append((name, args))


def cmake_calls(text: str) -> list:
    """[(command name, arguments joined by one space)]"""
    return [(name, " ".join(args)) for name, args in cmake_commands(text)]


def cmake_set_values(text: str) -> dict:
    """{variable: [values]} of every set() command (the last one wins)."""
    return {args[0]: args[1:] for name, args in cmake_commands(text) if name.lower() == "set" and args}


# -- loopback stand-ins --------------------------------------------------------------------------------


@contextlib.contextmanager
def silent_server():
    """A loopback port that accepts connections and never answers; yields its URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


@contextlib.contextmanager
def static_server(routes: dict):
    """A loopback HTTP server answering GET/POST ``path -> (status, content type, body bytes)``
    (404 with an HTML page otherwise); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, ctype, body = routes.get(self.path.split("?")[0],
                                             (404, "text/html", b"<html><body><h1>Not Found</h1></body></html>"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def unused_port_url() -> str:
    """The URL of a loopback port nothing listens on (a stopped server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- studies ---------------------------------------------------------------------------------------


def write_study(folder: Path, n_scans: int = 4, shape=(20, 40, 48), seed: int = 0) -> list:
    """A study of ``n_scans`` NIfTI volumes, each with its own non-trivial geometry (oblique
    directions, different spacings and origins), int16 like a real scan."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_scans):
        depth, rows, cols = shape[0] + 4 * k, shape[1], shape[2] + 8 * (k % 2)
        z = np.linspace(0, 1, depth)[:, None, None]
        vol = (rng.random((depth, rows, cols)) * 300 + 700 * z).astype(np.int16)
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.8 + 0.15 * k, 1.1, 2.0 + 0.5 * k))
        img.SetOrigin((-30.0 + 3 * k, 12.5 - k, -7.0 + 2 * k))
        angle = 0.2 * k
        c, s = float(np.cos(angle)), float(np.sin(angle))
        img.SetDirection((c, 0, s, 0, 1, 0, -s, 0, c) if k % 2 else (1, 0, 0, 0, c, -s, 0, s, c))
        path = folder / f"volume{k}.nii.gz"
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return paths
