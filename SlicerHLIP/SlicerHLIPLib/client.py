"""HTTP client of the HLIP MONAI Label server, with the standard library only (it runs inside
3D Slicer's Python, where nothing else may be installed, and in plain Python for tests); a heat
map's grid is read with SimpleITK, which Slicer's Python has.

    client = HLIPClient("http://127.0.0.1:8000")
    info = client.connect()                         # ServerInfo, or an HLIPError in words
    session = client.upload_study([UploadFile("t1.nii.gz"), UploadFile("flair.nii.gz")])
    result = client.findings(["midline shift"], session_id=session.session_id, heatmaps=True, out_dir="maps")
    result.rows[0].probability, result.heatmaps[0].path, result.heatmaps[0].header.affine_ras

Every call accepts ``progress(fraction or None, message)`` and a ``CancelToken``: uploads and
downloads check it between 1 MB chunks, and a request waiting for the server is abandoned at
once (its socket is shut down). Errors are ``errors.HLIPError`` subclasses whose message says
what to do; the technical detail is in ``error.detail`` and in the log.
"""
from __future__ import annotations

import contextlib
import email.message
import gzip
import http.client
import io
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import urlencode, urlsplit

from . import errors
from .multipart import FieldPart, FilePart, MultipartBody, MultipartError, boundary_of, read_multipart
from .volumefile import VolumeFileError, VolumeHeader, read_header
from .tasks import CancelToken

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Optional[float], str], None]

MODEL_TYPE = "hlip_findings"
CHUNK = 1 << 20
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_ERROR_BODY = 64 * 1024
# The JSON part of a multipart findings answer: 'params', as MONAI Label's own infer answers name
# it; 'result', as HLIP servers before it did.
ANSWER_PARTS = ("params", "result")


def _quiet(fraction: Optional[float], message: str = "") -> None:
    pass


def normalize_url(url: str) -> str:
    """``localhost:8000`` -> ``http://localhost:8000``; no trailing slash; only http(s)."""
    url = (url or "").strip()
    if not url:
        raise ValueError("Type the server's address, e.g. http://127.0.0.1:8000")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"The server address must start with http:// or https://, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError(f"The server address {url!r} names no host")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"The server address {url!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def safe_file_name(text: str, fallback: str = "file") -> str:
    """A file name made of letters, digits, '-', '_' and '.', never starting with '.'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")[:100]
    return name or fallback


def volume_suffix(name: str) -> str:
    lower = (name or "").lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), "")


# -- what the server answers ------------------------------------------------------------------------


@dataclass
class ServerInfo:
    url: str
    name: str
    version: str
    model: str  # name of the HLIP findings model on this server
    default_findings: list
    heatmaps: bool  # the server can return heat maps
    max_findings: int
    description: str = ""
    datastore: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # every model the server offers: name -> type (``model`` among them)


@dataclass
class ScanListing:
    image_id: str
    description: str = ""


@dataclass
class StudyListing:
    study_id: str
    scans: list
    embedded: bool = False
    error: Optional[str] = None


@dataclass
class SearchHit:
    study_id: str
    score: float
    scans: list


@dataclass
class SearchResult:
    query: str
    hits: list
    indexed: int = 0
    pending: int = 0


@dataclass
class UploadFile:
    """A local volume file to upload; ``filename`` is the name the server sees (default: the
    file's own), ``modality`` ("CT", "MR", ...) when known."""

    path: str
    filename: Optional[str] = None
    modality: Optional[str] = None


@dataclass
class UploadedStudy:
    session_id: str
    files: dict  # name the server sees -> local path


@dataclass
class FindingRow:
    index: int  # position in the question (0-based)
    finding: str
    probability: float
    score: float
    scan_id: str
    scan_description: str
    image_id: Optional[str]  # the server's image (or uploaded file name) of the scan that drives it
    heatmap: Optional[str] = None  # the name of its heat-map part


@dataclass
class HeatMap:
    finding: str
    path: str
    header: VolumeHeader


@dataclass
class FindingsResult:
    study_id: str
    rows: list
    heatmaps: dict  # row index -> HeatMap
    skipped: list
    server_ms: Optional[float]  # the server's own time (elapsed_ms), when it says
    seconds: float = 0.0  # this call, end to end


@dataclass
class DownloadedScan:
    image_id: str
    description: str
    path: str


# -- the client ------------------------------------------------------------------------------------


class HLIPClient:
    """One HLIP server. Thread-safe for independent calls (each opens its own connection).

    timeout: seconds allowed for ordinary requests (and for each read of an upload/download);
    infer_timeout: seconds allowed for the server to compute findings (heat maps take longest);
    connect_timeout: seconds to open a connection."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0, infer_timeout: float = 900.0,
                 connect_timeout: float = 10.0, ssl_context: Optional[ssl.SSLContext] = None):
        self.url = normalize_url(url)
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path
        self.token = token  # "Bearer <access token>" once logged in
        self.timeout = float(timeout)
        self.infer_timeout = float(infer_timeout)
        self.connect_timeout = float(connect_timeout)
        self.ssl_context = ssl_context
        self.info: Optional[ServerInfo] = None

    def __repr__(self) -> str:
        return f"HLIPClient({self.url!r})"

    @property
    def is_local(self) -> bool:
        return self._host in ("127.0.0.1", "localhost", "::1")

    # -- transport ---------------------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                               context=self.ssl_context or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        conn.connect()
        conn.sock.settimeout(timeout)
        return conn

    def _target(self, path: str, params: Optional[dict]) -> str:
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        return self._prefix + path + (f"?{query}" if query else "")

    def _transport_error(self, e: BaseException, cancel: Optional[CancelToken], what: str, timeout: float) -> errors.HLIPError:
        if cancel is not None and cancel.cancelled:
            return errors.Cancelled()
        name = f"{type(e).__name__}: {e}"
        if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
            return errors.RequestTimeout(f"The server at {self.url} did not answer {what} within {timeout:g} s. "
                                         "It may be overloaded; try again, or allow more time.", name)
        if isinstance(e, ConnectionRefusedError):
            return errors.ServerUnreachable(f"Server not reachable at {self.url}; is it running?", name)
        if isinstance(e, socket.gaierror):
            return errors.ServerUnreachable(f"The server address {self._host!r} cannot be found; check the URL.", name)
        if isinstance(e, ssl.SSLError):
            return errors.ServerUnreachable(f"The secure connection to {self.url} failed ({e.reason or e}); "
                                            "check that the server uses https and its certificate.", name)
        if isinstance(e, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead)):
            return errors.ServerUnreachable(f"The connection to {self.url} was lost {what}; the server may have stopped.", name)
        if isinstance(e, (http.client.HTTPException, MultipartError)):
            return errors.BadAnswer(f"The server at {self.url} sent an answer this module cannot read {what}; "
                                    "is it the HLIP server, and of a matching version?", name)
        if isinstance(e, OSError):
            return errors.ServerUnreachable(f"Cannot reach {self.url} ({e.strerror or e}).", name)
        raise e

    def _status_error(self, status: int, headers, body: bytes, what: str) -> errors.HLIPError:
        detail = ""
        text = body.decode("utf-8", "replace")
        try:
            detail = json.loads(text).get("detail", "")
        except (ValueError, AttributeError):
            pass
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
        detail = str(detail or re.sub(r"<[^>]+>|\s+", " ", text).strip()[:300] or http.client.responses.get(status, ""))
        technical = f"HTTP {status} {what}: {detail}"
        if status == 401:
            return errors.AuthenticationRequired(f"The server at {self.url} asks for a user name and password.", technical, status)
        if status == 403:
            return errors.PermissionDenied(f"Your user is not allowed {what} on this server ({detail}).", technical, status)
        if status == 404:
            return errors.NotFound(f"Not found on the server: {detail}", technical, status)
        if status == 503:
            try:
                retry = float(headers.get("Retry-After", "5"))
            except ValueError:
                retry = 5.0
            return errors.ServerBusy(f"The server is busy ({detail}); try again in {retry:g} s.", technical, status, retry_after=retry)
        if status >= 500:
            return errors.ServerError(f"The server failed {what}: {detail}", technical, status)
        return errors.RequestRejected(f"The server refused the request {what}: {detail}", technical, status)

    @contextlib.contextmanager
    def _exchange(self, method: str, path: str, *, params: Optional[dict] = None, body=None, content_type: Optional[str] = None,
                  timeout: Optional[float] = None, cancel: Optional[CancelToken] = None, progress: ProgressCallback = _quiet,
                  what: str = "", accept: str = "application/json"):
        """Send one request and yield the response when its status is 2xx; otherwise raise the
        HLIPError of its status. ``body``: bytes or a MultipartBody (streamed, with progress)."""
        timeout = self.timeout if timeout is None else float(timeout)
        cancel = cancel or CancelToken()
        cancel.check()
        conn = None
        unregister = lambda: None  # noqa: E731
        try:
            try:
                conn = self._connection(timeout)
            except BaseException as e:
                raise self._transport_error(e, cancel, what, self.connect_timeout) from None

            def abort(c=conn):
                sock = c.sock
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

            unregister = cancel.on_cancel(abort)
            cancel.check()
            try:
                response = self._send(conn, method, path, params, body, content_type, accept, cancel, progress)
            except errors.HLIPError:
                raise
            except BaseException as e:
                raise self._transport_error(e, cancel, what, timeout) from None
            if response.status >= 400:
                try:
                    data = response.read(MAX_ERROR_BODY)
                except (OSError, http.client.HTTPException):
                    data = b""
                error = self._status_error(response.status, response.headers, data, what)
                log.warning("%s %s -> %s", method, path, error.detail)
                raise error
            try:
                yield response
            except errors.HLIPError:
                raise
            except (OSError, http.client.HTTPException, MultipartError) as e:
                raise self._transport_error(e, cancel, what, timeout) from None
        finally:
            unregister()
            if conn is not None:
                conn.close()

    def _send(self, conn, method, path, params, body, content_type, accept, cancel, progress) -> http.client.HTTPResponse:
        conn.putrequest(method, self._target(path, params), skip_accept_encoding=True)
        conn.putheader("Accept", accept)
        conn.putheader("User-Agent", "SlicerHLIP")
        if self.token:
            conn.putheader("Authorization", self.token)
        if body is None:
            if method in ("POST", "PUT"):
                conn.putheader("Content-Length", "0")
            conn.endheaders()
        elif isinstance(body, (bytes, bytearray)):
            conn.putheader("Content-Type", content_type or "application/octet-stream")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(bytes(body))
        else:  # a MultipartBody, streamed
            total = len(body)
            conn.putheader("Content-Type", body.content_type)
            conn.putheader("Content-Length", str(total))
            conn.endheaders()
            sent = 0
            try:
                for piece in body.chunks(CHUNK):
                    cancel.check()
                    conn.send(piece)
                    sent += len(piece)
                    progress(sent / total if total else 1.0, "Uploading")
            except (BrokenPipeError, ConnectionResetError):
                if cancel.cancelled:
                    raise
                # the server may have refused the upload early (413) and closed: read its answer
                with contextlib.suppress(OSError, http.client.HTTPException):
                    return conn.getresponse()
                raise
        return conn.getresponse()

    def _json(self, method: str, path: str, *, what: str, params: Optional[dict] = None, body=None,
              content_type: Optional[str] = None, timeout: Optional[float] = None, cancel: Optional[CancelToken] = None,
              progress: ProgressCallback = _quiet):
        with self._exchange(method, path, params=params, body=body, content_type=content_type, timeout=timeout,
                            cancel=cancel, progress=progress, what=what) as response:
            data = response.read()
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise errors.BadAnswer(f"The server at {self.url} did not answer JSON {what}.", repr(data[:200]), 200) from None

    # -- connect and log in ------------------------------------------------------------------------

    def connect(self, cancel: Optional[CancelToken] = None) -> ServerInfo:
        """Ask the server what it is (GET /info/). Raises ServerUnreachable, NotHLIPServer,
        AuthenticationRequired, RequestTimeout... with a sentence for the user."""
        try:
            info = self._json("GET", "/info/", what="for its description", cancel=cancel)
        except (errors.NotFound, errors.RequestRejected, errors.BadAnswer) as e:
            raise errors.NotHLIPServer(f"Something answers at {self.url}, but it is not a MONAI Label server "
                                       f"(GET /info/ gave: {e.message}). Check the URL: it is the address given to "
                                       "`monailabel start_server`, e.g. http://127.0.0.1:8000.", e.detail, e.status) from None
        if not isinstance(info, dict) or not isinstance(info.get("models"), dict):
            raise errors.NotHLIPServer(f"The server at {self.url} is not a MONAI Label server (its /info/ lists no models).",
                                       repr(info)[:300])
        models = info["models"]
        offered = {str(k): str(v.get("type", "?")) if isinstance(v, dict) else "?" for k, v in models.items()}
        name = MODEL_TYPE if models.get(MODEL_TYPE, {}).get("type") == MODEL_TYPE else next(
            (k for k, v in models.items() if isinstance(v, dict) and v.get("type") == MODEL_TYPE), None)
        if name is None:
            raise errors.NotHLIPServer(f"The MONAI Label server at {self.url} has no HLIP findings model "
                                       f"(its models: {', '.join(f'{k} ({t})' for k, t in offered.items()) or 'none'}). "
                                       "Start it with --app monailabel_app.", repr(models)[:300])
        model = models[name]
        config = model.get("config") or {}
        labels = model.get("labels") or []
        if isinstance(labels, dict):  # MONAI Label allows {name: index}
            labels = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        self.info = ServerInfo(url=self.url, name=str(info.get("name", "")), version=str(info.get("version", "")), model=name,
                               default_findings=[str(x) for x in labels], heatmaps=bool(config.get("heatmaps", True)),
                               max_findings=int(config.get("max_findings", 32)), description=str(model.get("description", "")),
                               datastore=info.get("datastore") if isinstance(info.get("datastore"), dict) else {},
                               models=offered)
        return self.info

    def login(self, username: str, password: str, cancel: Optional[CancelToken] = None) -> bool:
        """MONAI Label's token route (POST /auth/token, password grant). True when a token was
        issued (then sent with every request), False when the server has authentication off."""
        body = urlencode({"username": username, "password": password, "grant_type": "password"}).encode()
        try:
            answer = self._json("POST", "/auth/token", what="to log in", body=body,
                                content_type="application/x-www-form-urlencoded", cancel=cancel)
        except (errors.AuthenticationRequired, errors.RequestRejected, errors.PermissionDenied) as e:
            raise errors.AuthenticationFailed("The server refused this user name and password.", e.detail, e.status) from None
        except errors.NotFound as e:
            raise errors.NotHLIPServer(f"The server at {self.url} has no MONAI Label login route (/auth/token).", e.detail, e.status) from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            self.token = None
            return False
        self.token = f"Bearer {token}"
        return True

    def auth_enabled(self, cancel: Optional[CancelToken] = None) -> bool:
        """MONAI Label's GET /auth/: whether the server asks for a login."""
        answer = self._json("GET", "/auth/", what="whether it needs a login", cancel=cancel)
        return bool(isinstance(answer, dict) and answer.get("enabled"))

    # -- datastore, search ---------------------------------------------------------------------------

    def studies(self, cancel: Optional[CancelToken] = None) -> list:
        """The studies of the server's datastore: [StudyListing]."""
        answer = self._json("GET", "/hlip/studies", what="for its list of studies", cancel=cancel)
        return [StudyListing(str(s["study_id"]), [ScanListing(str(sc["image_id"]), str(sc.get("description", ""))) for sc in s.get("scans", [])],
                             bool(s.get("embedded", False)), s.get("error")) for s in answer.get("studies", [])]

    def _hits(self, answer: dict) -> SearchResult:
        hits = [SearchHit(str(r["study_id"]), float(r["score"]), [ScanListing(str(sc["image_id"]), str(sc.get("description", "")))
                                                                   for sc in r.get("scans", [])]) for r in answer.get("results", [])]
        return SearchResult(str(answer.get("query", "")), hits, int(answer.get("indexed", 0)), int(answer.get("pending", 0)))

    def search(self, text: str, k: int = 10, cancel: Optional[CancelToken] = None) -> SearchResult:
        """Studies of the datastore that match ``text``, best first."""
        return self._hits(self._json("GET", "/hlip/search", params={"text": text, "k": k}, what="to search", cancel=cancel))

    def similar(self, study: str, k: int = 10, cancel: Optional[CancelToken] = None) -> SearchResult:
        """Studies of the datastore like ``study`` (a study or image id), best first."""
        return self._hits(self._json("GET", "/hlip/similar", params={"study": study, "k": k}, what="to find similar studies", cancel=cancel))

    def status(self, cancel: Optional[CancelToken] = None) -> dict:
        return self._json("GET", "/hlip/status", what="for its status", cancel=cancel)

    def _download(self, response, target: Path, progress: ProgressCallback, cancel: CancelToken, message: str) -> None:
        total = int(response.headers.get("Content-Length") or 0)
        partial = target.with_name(f".partial-{uuid.uuid4().hex}-{target.name}")
        done = 0
        try:
            with open(partial, "wb") as out:
                while True:
                    cancel.check()
                    piece = response.read(CHUNK)
                    if not piece:
                        break
                    out.write(piece)
                    done += len(piece)
                    progress(done / total if total else None, message)
            if total and done != total:
                raise errors.ServerUnreachable(f"The download from {self.url} stopped after {done} of {total} bytes.")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def download_image(self, image_id: str, folder, progress: ProgressCallback = _quiet,
                       cancel: Optional[CancelToken] = None) -> str:
        """One datastore volume (GET /datastore/image) into ``folder``; returns its path. The file
        appears only when complete."""
        cancel = cancel or CancelToken()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._exchange("GET", "/datastore/image", params={"image": image_id}, what=f"to send image {image_id}",
                            cancel=cancel, accept="*/*") as response:
            message = email.message.Message()
            message["Content-Disposition"] = response.headers.get("Content-Disposition", "")
            suffix = volume_suffix(message.get_filename() or "") or ".nii.gz"
            target = folder / (safe_file_name(image_id, "image") + suffix)
            self._download(response, target, progress, cancel, f"Downloading {image_id}")
        return str(target)

    def download_study(self, study_id: str, folder, progress: ProgressCallback = _quiet,
                       cancel: Optional[CancelToken] = None) -> list:
        """Every scan of a datastore study into ``folder``: [DownloadedScan]."""
        cancel = cancel or CancelToken()
        listing = next((s for s in self.studies(cancel) if s.study_id == study_id), None)
        if listing is None:
            raise errors.NotFound(f"Not found on the server: no study {study_id!r} in its datastore.")
        out = []
        n = len(listing.scans)
        for i, scan in enumerate(listing.scans):
            def step(fraction, message, i=i):
                progress(None if fraction is None else (i + fraction) / n, message)

            path = self.download_image(scan.image_id, folder, step, cancel)
            out.append(DownloadedScan(scan.image_id, scan.description, path))
        return out

    # -- a study's findings ---------------------------------------------------------------------------

    def upload_study(self, files: Iterable, progress: ProgressCallback = _quiet, cancel: Optional[CancelToken] = None,
                     compress: bool = False, expiry: int = 0) -> UploadedStudy:
        """The volumes of one study as one upload session (PUT /session/). ``files``: UploadFile
        or paths. ``compress``: gzip uncompressed .nii files first (worth it over a network, not
        on this machine). Returns the session id and the names the server saw."""
        cancel = cancel or CancelToken()
        files = [f if isinstance(f, UploadFile) else UploadFile(str(f)) for f in files]
        if not files:
            raise ValueError("Choose at least one volume of the study.")
        names: dict = {}
        parts, scans = [], []
        scratch = None
        try:
            for i, f in enumerate(files):
                path = Path(f.path)
                if not path.is_file():
                    raise ValueError(f"{path} does not exist")
                name = f.filename or path.name
                suffix = volume_suffix(name) or volume_suffix(path.name)
                if not suffix:
                    raise ValueError(f"{path.name}: upload volumes as .nii, .nii.gz, .nrrd or .mha files")
                stem = safe_file_name(name[: -len(suffix)] if name.lower().endswith(suffix) else name, f"scan{i:02d}")
                name = stem + suffix
                if compress and suffix == ".nii":
                    scratch = scratch or Path(tempfile.mkdtemp(prefix="hlip-upload-"))
                    packed = scratch / (stem + ".nii.gz")
                    cancel.check()
                    with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    path, name = packed, stem + ".nii.gz"
                if name in names:
                    raise ValueError(f"two volumes would be uploaded as {name}; give them distinct file names")
                names[name] = str(f.path)
                parts.append(FilePart("files", str(path), name))
                scans.append({"file": name, **({"modality": f.modality} if f.modality else {})})
            # the modality of each file travels beside the files (volume files do not carry it)
            parts.append(FieldPart("scans", json.dumps(scans), "application/json"))
            body = MultipartBody(parts)
            answer = self._json("PUT", "/session/", params={"expiry": expiry} if expiry else None, body=body,
                                what="to receive the study", cancel=cancel, progress=progress)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        session_id = answer.get("session_id") if isinstance(answer, dict) else None
        if not session_id:
            raise errors.BadAnswer(f"The server at {self.url} accepted the upload but named no session.", repr(answer)[:300])
        return UploadedStudy(str(session_id), names)

    def check_findings(self, findings) -> list:
        """The findings as sent: a non-empty list of non-empty strings, within the server's limit."""
        if isinstance(findings, str):
            findings = [findings]
        findings = [" ".join(str(f).split()) for f in findings]
        if not findings or not all(findings):
            raise ValueError("Type at least one finding (one per line), e.g. 'intracranial haemorrhage'.")
        limit = self.info.max_findings if self.info else None
        if limit and len(findings) > limit:
            raise ValueError(f"{len(findings)} findings typed; this server answers at most {limit} per question.")
        return findings

    def findings(self, findings, *, study: Optional[str] = None, session_id: Optional[str] = None, heatmaps: bool = True,
                 out_dir=None, progress: ProgressCallback = _quiet, cancel: Optional[CancelToken] = None,
                 busy_retries: int = 0) -> FindingsResult:
        """Ask the server about one study: a datastore study or image id (``study``) or an upload
        (``session_id``). With ``heatmaps`` each finding's heat map is written to ``out_dir`` as
        a NIfTI file (in the geometry of the scan that drives the finding). A full queue (503) is
        retried up to ``busy_retries`` times after the wait the server asks for."""
        started = time.perf_counter()
        cancel = cancel or CancelToken()
        findings = self.check_findings(findings)
        if bool(study) == bool(session_id):
            raise ValueError("give exactly one of study= (a datastore study or image id) or session_id= (an upload)")
        if heatmaps and out_dir is None:
            raise ValueError("heat maps need an out_dir to be written to")
        model = self.info.model if self.info else MODEL_TYPE
        body = json.dumps({"findings": findings, "heatmaps": bool(heatmaps)}).encode("utf-8")
        params = {"image": study} if study else {"session_id": session_id}
        attempt = 0
        while True:
            progress(None, "The server is reading the study and computing the findings")
            try:
                with self._exchange("POST", f"/infer/{model}", params=params, body=body, content_type="application/json",
                                    timeout=self.infer_timeout, cancel=cancel, what="to compute the findings",
                                    accept="application/json, multipart/form-data") as response:
                    result = self._read_findings(response, out_dir, progress, cancel)
                break
            except errors.ServerBusy as busy:
                attempt += 1
                if attempt > busy_retries:
                    raise
                wait = min(max(busy.retry_after, 0.5), 60.0)
                log.info("server busy; retrying in %.1f s (%d/%d)", wait, attempt, busy_retries)
                progress(None, f"The server is busy; trying again in {wait:g} s")
                if cancel.wait(wait):
                    raise errors.Cancelled() from None
        result.seconds = time.perf_counter() - started
        progress(1.0, "Findings received")
        return result

    def _read_findings(self, response, out_dir, progress: ProgressCallback, cancel: CancelToken) -> FindingsResult:
        ctype = response.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            answer = json.loads(response.read().decode("utf-8"))
            return self._findings_result(answer, {})
        if not ctype.startswith("multipart/"):
            raise errors.BadAnswer(f"The server answered the findings as {ctype or 'nothing'}; expected JSON or multipart.")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        total = int(response.headers.get("Content-Length") or 0)
        written: dict = {}  # part name -> final path
        result_json = io.BytesIO()

        def open_part(headers):
            cancel.check()
            if headers.name in ANSWER_PARTS:
                return result_json
            name = safe_file_name(headers.name or "", f"part{len(written)}")
            suffix = volume_suffix(headers.filename or "") or ".nii.gz"
            final = out / (name + suffix)
            partial = out / f".partial-{uuid.uuid4().hex}{suffix}"
            sink = open(partial, "wb")
            sink.hlip_paths = (partial, final, headers.name)  # type: ignore[attr-defined]
            return sink

        def close_part(headers, sink):
            if sink is result_json:
                return
            sink.close()
            partial, final, name = sink.hlip_paths
            os.replace(partial, final)
            written[name] = final

        def on_bytes(n: int) -> None:
            cancel.check()
            progress(n / total if total else None, "Receiving the findings and heat maps")

        sinks = []

        def tracked_open(headers):
            sink = open_part(headers)
            sinks.append(sink)
            return sink

        try:
            read_multipart(response.read, boundary_of(ctype), tracked_open, close_part, CHUNK, on_bytes)
            if not result_json.getvalue():
                raise errors.BadAnswer("The server's multipart answer has no 'params' (or 'result') part.")
            answer = json.loads(result_json.getvalue().decode("utf-8"))
            return self._findings_result(answer, written)
        except BaseException:
            for sink in sinks:  # nothing half-written stays behind, nor maps of an answer not returned
                if sink is not result_json:
                    with contextlib.suppress(OSError):
                        sink.close()
                    partial, final, _ = sink.hlip_paths
                    partial.unlink(missing_ok=True)
                    if written.get(sink.hlip_paths[2]) == final:
                        final.unlink(missing_ok=True)
            raise

    def _findings_result(self, answer: dict, written: dict) -> FindingsResult:
        try:
            rows, heatmaps = [], {}
            for i, r in enumerate(answer["findings"]):
                row = FindingRow(i, str(r["finding"]), float(r["probability"]), float(r.get("score", 0.0)), str(r.get("scan_id", "")),
                                 str(r.get("scan_description", "")), r.get("image_id"), r.get("heatmap"))
                rows.append(row)
                if row.heatmap is not None:
                    if row.heatmap not in written:
                        raise errors.BadAnswer(f"The server's answer names heat map {row.heatmap!r} but does not carry it.")
                    path = written[row.heatmap]
                    try:
                        header = read_header(path)
                    except VolumeFileError as e:
                        raise errors.BadAnswer(f"The heat map of {row.finding!r} is not a volume file.", str(e)) from None
                    heatmaps[i] = HeatMap(row.finding, str(path), header)
            return FindingsResult(str(answer.get("study_id", "")), rows, heatmaps, [str(s) for s in answer.get("skipped", [])],
                                  answer.get("elapsed_ms"))
        except (KeyError, TypeError, ValueError) as e:
            raise errors.BadAnswer("The server's findings answer is not in the expected form.", f"{type(e).__name__}: {e}") from None
