"""HTTP routes of the HLIP app, installed on MONAI Label's FastAPI app by ``monailabel_app/asgi.py``.

- ``POST /infer/{model}`` replaces MONAI Label's: the model runs on the worker thread (the stock
  route runs it inside the event loop and stalls every other request), with a bounded queue (503
  and Retry-After past it).
- ``GET|HEAD /datastore/image`` and ``PUT /session/`` keep MONAI Label's contract but run off the
  event loop (a DICOM series may be downloaded or converted first) and check sizes and names.
- ``GET /hlip/search``, ``/hlip/similar``, ``/hlip/studies``, ``/hlip/status``.
- Every error is JSON ``{"detail": "<in words>"}``; ids with '/' or '..' are refused before any
  route sees them; bodies above ``--conf max_upload_mb`` are refused with 413.

This module reaches the app only through ``app_instance()`` (MONAI Label loads the app's ``lib``
package under its own name), so nothing here depends on class identity across the two imports.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException
from monailabel.interfaces.utils.app import app_instance, apps, clear_cache
from monailabel.utils.others.generic import file_checksum, get_mime_type
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from hlip_core.data.limits import VolumeTooLarge, copy_capped

from .datastore.catalog import unsafe_id_reason
from .sessions import SessionsFull
from .uploads import TempSweepMiddleware, as_http, check_uploaded

log = logging.getLogger(__name__)

ID_PARAMS = {"image", "session_id", "study", "label", "id", "tag", "model"}
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
MAX_UPLOAD_FILES = 100_000

router = APIRouter()
USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))


def hlip():
    """The running app's HLIPService."""
    service = getattr(app_instance(), "hlip", None)
    if service is None:
        raise HTTPException(status_code=500, detail="the running MONAI Label app is not the HLIP app (--app monailabel_app)")
    return service


# -- findings ---------------------------------------------------------------------------------------


async def read_params(request: Request) -> tuple[dict, object]:
    """(``params``, the uploaded ``file`` or None): params as a multipart/urlencoded form field
    (MONAI Label's way) or as a JSON body; ``file`` a volume sent with the request (MONAI Label's
    ``infer(file=...)``), to be scored as a study of that one scan."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw, upload = "{}", None
    if ctype == "application/json":
        body = await request.body()
        raw = body.decode("utf-8", "replace") if body.strip() else "{}"
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        upload = form.get("file")
        if upload is not None and isinstance(upload, str):
            raise HTTPException(status_code=400, detail="the 'file' field must be a volume file (NIfTI/NRRD/MHA or DICOM), not text")
        value = form.get("params")
        if value is not None:
            raw = value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
    else:
        body = await request.body()
        if body.strip():
            raise HTTPException(status_code=415, detail=f"send params as JSON (Content-Type: application/json) or as the form field 'params', "
                                                        f"not as {ctype or 'a body without a Content-Type'}")
    params = parse_json(raw, "params")
    if not isinstance(params, dict):
        raise HTTPException(status_code=400, detail="params must be a JSON object, e.g. {\"findings\": [\"midline shift\"], \"heatmaps\": true}")
    return params, upload


MAX_JSON_CHARS = 1 << 20
MAX_JSON_DEPTH = 32


def _depth(text: str) -> int:
    """How deeply ``text`` nests brackets (outside strings), counted without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, in_string) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(raw: str, what: str):
    """``raw`` parsed as JSON, refused with 400 when longer than MAX_JSON_CHARS, nested deeper than
    MAX_JSON_DEPTH or not JSON (the parser never recurses deeply)."""
    raw = raw or "{}"
    if len(raw) > MAX_JSON_CHARS:
        raise HTTPException(status_code=400, detail=f"{what} is longer than {MAX_JSON_CHARS} characters")
    if _depth(raw) > MAX_JSON_DEPTH:
        raise HTTPException(status_code=400, detail=f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise HTTPException(status_code=400, detail=f"{what} is not valid JSON ({str(e)[:200]})") from None


CHUNK = 1 << 20


def send_body(body: bytes, content_type: str) -> StreamingResponse:
    """A large answer in 1 MB pieces, so that other requests are served between them."""
    view = memoryview(body)

    async def pieces():
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])

    return StreamingResponse(pieces(), media_type=content_type, headers={"Content-Length": str(len(body))})


@router.post("/infer/{model}", summary=f"{RBAC_USER}Findings for a whole study (HLIP)", tags=["Infer"])
async def api_infer(request: Request, model: str, image: str = "", session_id: str = "", output: str = "", user: User = USER):
    start = time.perf_counter()
    service = hlip()
    infers = app_instance()._infers
    if model not in infers:
        raise HTTPException(status_code=404, detail=f"no such model; this server has: {', '.join(infers)}")
    if output not in ("", "json", "all"):
        raise HTTPException(status_code=400, detail=f"output={output!r} is not offered by {model}: it answers JSON (and multipart with heat maps)")
    params, upload = await read_params(request)
    if upload is not None and session_id:
        raise HTTPException(status_code=400, detail="give either the 'file' upload or session_id=<upload session id>, not both")
    if upload is None and bool(image) == bool(session_id):
        raise HTTPException(status_code=400, detail="give exactly one of image=<image or study id>, session_id=<upload session id> "
                                                    "or a volume as the multipart field 'file'")
    findings = service.findings_names(params)
    heatmaps = service.want_heatmaps(params)
    heatmap_format, all_scans = service.heatmap_options(params)
    if upload is not None:  # MONAI Label's infer(file=...): a study of this one scan, in the temporary area until answered
        folder, study = await run_in_threadpool(_file_study, [upload])
        try:
            return await _answer(service, study, findings, heatmaps, heatmap_format, all_scans, start, "file")
        finally:
            await run_in_threadpool(shutil.rmtree, folder, True)
    if image:  # a study the catalog knows is found at once; otherwise the datastore is asked (blocking I/O) off the loop
        study = service.known(image) or await run_in_threadpool(service.resolve, image)
    else:
        study = await run_in_threadpool(service.session_study, session_id)
    return await _answer(service, study, findings, heatmaps, heatmap_format, all_scans, start, "image" if image else "session")


async def _answer(service, study, findings: list[str], heatmaps: bool, heatmap_format: str, all_scans: bool, start: float, what: str):
    """The findings answer for ``study``: from memory when cached, else computed on the worker."""
    if not heatmaps:
        cached = service.task.cached(study, findings)
        if cached is not None:
            cached["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
            return JSONResponse(cached)
    future = service.submit_findings(study, findings, heatmaps, start, heatmap_format, all_scans)
    try:
        answer = await asyncio.wait_for(asyncio.wrap_future(future), settings.MONAI_LABEL_INFER_TIMEOUT)
    except asyncio.TimeoutError:
        raise HTTPException(status_code=504, detail=f"the findings took longer than {settings.MONAI_LABEL_INFER_TIMEOUT} s") from None
    except HTTPException:
        raise
    except ValueError as e:  # NoUsableScanError: the study's series cannot be used (the reasons are in the message)
        raise HTTPException(status_code=422, detail=str(e)) from None
    except FileNotFoundError:  # deleted from the studies folder (or the session expired) since it was listed
        raise HTTPException(status_code=404, detail=f"files of this {what} are gone from the datastore; list the studies again") from None
    return send_body(*answer) if heatmaps else JSONResponse(answer)


# -- datastore volumes and upload sessions ----------------------------------------------------------


def _image_file(image: str) -> str:
    reason = unsafe_id_reason(image)
    if reason:
        raise HTTPException(status_code=400, detail=f"image id {image[:80]!r} {reason}")
    path = app_instance().datastore().get_image_uri(image)
    if not path or not os.path.isfile(path):
        raise HTTPException(status_code=404, detail="no image with this id in the datastore")
    return path


@router.head("/datastore/image", summary=f"{RBAC_USER}Check If Image Exists", tags=["Datastore"])
def api_check_image(image: str, check_sum: str | None = None, user: User = USER):
    path = _image_file(image)
    if check_sum:
        fields = check_sum.split(":")
        algo = "SHA256" if len(fields) == 1 else fields[0]
        if fields[-1] != file_checksum(path, algo=algo):
            raise HTTPException(status_code=404, detail="Image NOT Found (checksum failed)")
    return {}


@router.get("/datastore/image", summary=f"{RBAC_USER}Download Image", tags=["Datastore"])
def api_download_image(image: str, user: User = USER):
    path = _image_file(image)
    return FileResponse(path, media_type=get_mime_type(path), filename=os.path.basename(path))


def _unusable_reason(path: str) -> str | None:
    """Why an uploaded file is not a volume the ingestion can read (None when it looks fine): volume
    files must have a readable header, anything else must be DICOM as
    the ingestion recognises it (hlip_core.data.looks_like_dicom: with or without preamble)."""
    if path.lower().endswith(VOLUME_EXTENSIONS):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return "is not a readable NIfTI/NRRD/MHA volume"
        return None
    from hlip_core.data import NOT_DICOM, looks_like_dicom  # the ingestion's own recognition

    return None if looks_like_dicom(path) else f"is neither DICOM nor a NIfTI/NRRD/MHA volume ({NOT_DICOM})"


def _modalities(scans: str | None, sent: dict[str, str]) -> dict[str, str]:
    """The ``scans`` form field, ``[{"file": <name as sent>, "modality": "CT"}, ...]``, as
    {stored file name: modality}; ``sent`` maps each sent file name to its stored name."""
    from .configs.hlip import modality_code

    if scans is None or not scans.strip():
        return {}
    items = parse_json(scans, "the 'scans' field")
    example = '[{"file": "scan00.nii.gz", "modality": "CT"}]'
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("file"), str) for i in items):
        raise HTTPException(status_code=400, detail=f"the 'scans' field must be a JSON list of objects with a 'file' name, e.g. {example}")
    out: dict[str, str] = {}
    for item in items:
        name = item["file"]
        if name not in sent:
            raise HTTPException(status_code=400, detail=f"the 'scans' field names {name[:80]!r}, which is not a file of this upload")
        if sent[name] is None:
            raise HTTPException(status_code=400, detail=f"{name[:80]!r} was uploaded more than once; the 'scans' field cannot tell which is meant")
        unknown = sorted(set(item) - {"file", "modality"})
        if unknown:
            raise HTTPException(status_code=400, detail=f"the 'scans' entry of {name[:80]!r} has unknown key(s) {', '.join(unknown)}; known: file, modality")
        if item.get("modality") is None:
            continue
        try:
            out[sent[name]] = modality_code(item["modality"], f"the modality of {name[:80]!r}")
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
    return out


def _copy_member(src, dst, left: int, declared: int) -> int:
    """One archive member copied with a running cap (the total ``left``, and its declared size:
    a member's header may lie); 413 past either."""
    try:
        return copy_capped(src, dst, min(left, declared), "an archive member" if declared < left else "the archive")
    except VolumeTooLarge as e:
        raise as_http(e) from None


def _safe_extract(archive: str, target: str, limit: int) -> None:
    left = limit
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > limit:
                raise HTTPException(status_code=413, detail="the archive unpacks to more than the upload limit (--conf max_upload_mb)")
            for i, m in enumerate(members):
                name = os.path.basename(m.filename)
                if not name or name.startswith("."):
                    continue
                with z.open(m) as src, open(os.path.join(target, f"{i:06d}_{name}"), "wb") as dst:
                    left -= _copy_member(src, dst, left, m.file_size)  # flattened: no member path is ever used as a path
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile()]
            if sum(m.size for m in members) > limit:
                raise HTTPException(status_code=413, detail="the archive unpacks to more than the upload limit (--conf max_upload_mb)")
            for i, m in enumerate(members):
                name = os.path.basename(m.name)
                if not name or name.startswith("."):
                    continue
                with t.extractfile(m) as src, open(os.path.join(target, f"{i:06d}_{name}"), "wb") as dst:
                    left -= _copy_member(src, dst, left, m.size)
        return
    raise HTTPException(status_code=400, detail="uncompress=true needs one .zip or .tar(.gz) file")


def _receive(files: list, scans: str | None, uncompress: bool) -> tuple[str, list[str], dict, dict]:
    """The uploaded ``files`` written to a new folder of the temporary area, archives unpacked
    (``uncompress``), each file checked (400 unusable, 413 past --conf max_voxels, 422 truncated or
    NaN). Returns (folder, stored names, {sent name: stored name or None when sent twice},
    {stored name: modality} from the ``scans`` field). The caller removes the folder."""
    service = hlip()
    if uncompress and scans:
        raise HTTPException(status_code=400, detail="the 'scans' field names uploaded files; it cannot name the files inside an archive (uncompress=true)")
    received = tempfile.mkdtemp(prefix="upload-")
    try:
        names, sent = [], {}
        for i, f in enumerate(files):
            name = os.path.basename((f.filename or "").replace("\\", "/"))
            if not name or unsafe_id_reason(name):
                name = f"file{i:05d}"
            stored = f"{i:05d}_{name}" if name in names else name  # never a path from the client, never twice
            names.append(name)
            sent[f.filename] = None if f.filename in sent else stored
            with open(os.path.join(received, stored), "wb") as out:
                shutil.copyfileobj(f.file, out)
        modalities = _modalities(scans, sent)
        if uncompress:
            if len(files) != 1:
                raise HTTPException(status_code=400, detail="uncompress=true needs exactly one archive file")
            archive = os.path.join(received, os.listdir(received)[0])
            unpacked = tempfile.mkdtemp(prefix="unpacked-")
            try:
                _safe_extract(archive, unpacked, service.config.max_upload_bytes)
            except BaseException:
                shutil.rmtree(unpacked, ignore_errors=True)
                raise
            shutil.rmtree(received, ignore_errors=True)
            received = unpacked
        stored = sorted(os.listdir(received))
        if not stored:
            raise HTTPException(status_code=400, detail="the upload holds no files")
        bad = [(n, r) for n in stored for r in [_unusable_reason(os.path.join(received, n))] if r]
        if bad:
            more = f" ({len(bad)} such files)" if len(bad) > 1 else ""
            raise HTTPException(status_code=400, detail=f"uploaded file {bad[0][0][:80]!r} {bad[0][1]}{more}")
        for n in stored:  # before anything reads their voxels: 413 past --conf max_voxels, 422 truncated/NaN
            check_uploaded(os.path.join(received, n), service.config.max_voxels, n)
        return received, stored, sent, modalities
    except BaseException:
        shutil.rmtree(received, ignore_errors=True)
        raise


def _store_session(files: list, scans: str | None, uncompress: bool, expiry: int) -> dict:
    service = hlip()
    if service.sessions is None:
        raise HTTPException(status_code=406, detail="upload sessions are switched off on this server (MONAI_LABEL_SESSIONS=false); "
                                                    "send the volume with the findings request instead (POST /infer/<model> with the multipart field 'file')")
    received, stored, sent, modalities = _receive(files, scans, uncompress)
    try:
        source = received if len(stored) > 1 else os.path.join(received, stored[0])
        try:
            session_id, info = service.sessions.add_study(source, expiry, {"modalities": modalities})
        except SessionsFull as e:
            raise HTTPException(status_code=413, detail=str(e)) from None
        default = service.config.volume_modality
        understood = [{"file": name, "modality": modalities.get(where, default)} for name, where in sent.items()
                      if where is not None and where.lower().endswith(VOLUME_EXTENSIONS)] if not uncompress else []
        return {"session_id": session_id, "session_info": session_json(info), "scans": understood}
    finally:
        shutil.rmtree(received, ignore_errors=True)  # moved into the session store on success


FILE_STUDY_ID = "uploaded-file"  # the study_id of an answer to infer(file=...): no session is kept for it


def _file_study(files: list) -> tuple[str, object]:
    """(temporary folder, StudyEntry) of the volume sent with a findings request (MONAI Label's
    ``infer(file=...)``): works with sessions on or off, keeps nothing after the answer."""
    from .datastore.catalog import ScanEntry, StudyEntry

    received, stored, _, _ = _receive(files, None, False)
    scans = [ScanEntry(n, n, "", [os.path.join(received, n)]) for n in stored]
    return received, StudyEntry(FILE_STUDY_ID, scans, signature="", temporary=True)


def session_json(info) -> dict:
    """MONAI Label's session info without the server's own paths (``path``, ``image``)."""
    return {k: v for k, v in info.to_json().items() if k not in ("path", "image")}


@router.get("/session/{session_id}", summary=f"{RBAC_USER}Get Session", tags=["Session"])
def api_get_session(session_id: str, update_ts: bool = False, image: bool = False, user: User = USER):
    info = hlip().session_info(session_id, update_ts=update_ts)
    if image:
        if os.path.isdir(info.image):
            raise HTTPException(status_code=400, detail="this session holds several files; image=true returns a session of one file only")
        # named after the session, not as uploaded: a file's name may carry a patient's name
        extension = next((e for e in VOLUME_EXTENSIONS if info.image.lower().endswith(e)), "")
        return FileResponse(info.image, media_type=get_mime_type(info.image), filename=f"{session_id}{extension}")
    return session_json(info)


@router.delete("/session/{session_id}", summary=f"{RBAC_USER}Delete Session", tags=["Session"])
def api_remove_session(session_id: str, user: User = USER):
    service = hlip()
    info = service.session_info(session_id)
    service.sessions.remove_session(session_id)
    return session_json(info)


@router.put("/session/", summary=f"{RBAC_USER}Create new session with the volumes of one study", tags=["Session"])
async def api_create_session(request: Request, uncompress: bool = False, expiry: int = 0, user: User = USER):
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        raise HTTPException(status_code=400, detail="send the study's volumes as multipart/form-data fields named 'files'")
    form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=1000)
    try:
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise HTTPException(status_code=400, detail="no files in the upload; send the study's volumes as fields named 'files'")
        scans = form.get("scans")
        if scans is not None and not isinstance(scans, str):  # sent as a file part: read it (it is small)
            scans = (await scans.read(1 << 20)).decode("utf-8", "replace")
        return await run_in_threadpool(_store_session, files, scans, uncompress, expiry)
    finally:
        await form.close()


# -- search -----------------------------------------------------------------------------------------


@router.get("/hlip/search", summary=f"{RBAC_USER}Studies of the datastore that match a text", tags=["HLIP"])
def api_search(text: str, k: int = 10, user: User = USER):
    return hlip().search(text, k)


@router.get("/hlip/similar", summary=f"{RBAC_USER}Studies of the datastore like a given one", tags=["HLIP"])
def api_similar(study: str, k: int = 10, user: User = USER):
    return hlip().similar(study, k)


@router.get("/hlip/studies", summary=f"{RBAC_USER}Studies of the datastore and their scans", tags=["HLIP"])
def api_studies(user: User = USER):
    return {"studies": hlip().studies()}


@router.get("/hlip/status", summary=f"{RBAC_USER}Inference queue and embedding cache", tags=["HLIP"])
def api_status(user: User = USER):
    return hlip().status()


# -- MONAI Label's routes that do not apply to this app --------------------------------------------
# (the stock ones would start a background process that loads the whole app only to fail)


@router.post("/train/", summary=f"{RBAC_USER}Not offered: HLIP models are trained with train/pretrain.py", tags=["Train"])
@router.post("/train/{model}", summary=f"{RBAC_USER}Not offered: HLIP models are trained with train/pretrain.py", tags=["Train"])
def api_no_training(model: str = "", user: User = USER):
    raise HTTPException(status_code=404, detail="this server does not train models: train with train/pretrain.py, "
                                                "then restart the server with --conf checkpoint <the new checkpoint>")


@router.post("/batch/infer/{model}", summary=f"{RBAC_USER}Not offered: findings are asked per study", tags=["Infer"])
def api_no_batch_infer(model: str, user: User = USER):
    raise HTTPException(status_code=400, detail="hlip_findings runs per study: POST /infer/hlip_findings?image=<study id>; "
                                                "the datastore's embeddings for search are computed in the background")


NOT_OFFERED = "this server scores whole studies with an HLIP model; it has no {what} (MONAI Label's {route} does not apply)"


@router.api_route("/scoring/", methods=["GET", "POST", "DELETE"], include_in_schema=False)
@router.api_route("/scoring/{method}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
def api_no_scoring(method: str = "", user: User = USER):
    raise HTTPException(status_code=404, detail=NOT_OFFERED.format(what="scoring methods", route="/scoring/"))


@router.api_route("/activelearning/{strategy}", methods=["GET", "POST"], include_in_schema=False)
def api_no_active_learning(strategy: str, user: User = USER):
    raise HTTPException(status_code=404, detail=NOT_OFFERED.format(what="active learning strategies", route="/activelearning/"))


@router.api_route("/datastore/label", methods=["PUT", "DELETE"], include_in_schema=False)
@router.api_route("/datastore/label/info", methods=["PUT"], include_in_schema=False)
@router.api_route("/datastore/updatelabelinfo", methods=["PUT"], include_in_schema=False)
def api_no_labels(user: User = USER):
    raise HTTPException(status_code=405, detail=NOT_OFFERED.format(what="labels to save", route="label saving"), headers={"Allow": "GET, HEAD"})


@router.get("/datastore/image/info", summary=f"{RBAC_USER}Get Image Info", tags=["Datastore"])
def api_image_info(image: str, user: User = USER):
    _image_file(image)  # 404 for an unknown id
    return app_instance().datastore().get_image_info(image)


no_logs = APIRouter()  # installed only with auth off: with auth on, MONAI Label's admin-only /logs/ answers


@no_logs.get("/logs/", include_in_schema=False)
@no_logs.get("/logs/{what}", include_in_schema=False)
def api_no_logs(what: str = ""):
    raise HTTPException(status_code=403, detail="the server log is offered only with auth on (MONAI_LABEL_AUTH_ENABLE=true), to admins")


no_proxy = APIRouter()  # installed only when the studies are a folder


@no_proxy.api_route("/proxy/dicom/{path:path}", methods=["GET", "POST"], include_in_schema=False)
def api_no_proxy(path: str, user: User = USER):
    raise HTTPException(status_code=404, detail="this server's studies are a folder, not a DICOMweb server: there is nothing to proxy")


# -- errors, guards, lifespan -----------------------------------------------------------------------


def _words(errors) -> str:
    out = []
    for e in errors:
        where = " ".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        out.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(out) or "invalid request"


async def on_validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(status_code=422, content={"detail": _words(exc.errors())})


async def on_monailabel_error(request: Request, exc: MONAILabelException):
    status = 404 if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)) else 400
    return JSONResponse(status_code=status, content={"detail": str(getattr(exc, "msg", exc))})


async def on_upstream_error(request: Request, exc):
    log.warning("upstream server error on %s: %s", request.url.path, exc)
    refused = getattr(getattr(exc, "response", None), "status_code", None) in (400, 401, 403)
    if refused and request.url.path.endswith("/auth/token"):  # the identity provider said no
        return JSONResponse(status_code=401, content={"detail": "the identity provider refused this user name and password"},
                            headers={"WWW-Authenticate": "Bearer"})
    return JSONResponse(status_code=502, content={"detail": f"a server this one depends on did not answer properly ({type(exc).__name__}: {exc})"})


async def on_client_gone(request: Request, exc: ClientDisconnect):
    # the client hung up mid-upload (a cancel): nothing to answer, nothing wrong with the server
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return JSONResponse(status_code=400, content={"detail": "the client disconnected before the request was complete"})


async def on_any_error(request: Request, exc: Exception):
    log.error("error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}); the server log has the details"})


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _upload_limit() -> int | None:
    for instance in list(apps.values()):
        config = getattr(instance, "hlip_config", None)
        if config is not None:
            return config.max_upload_bytes
    return None


class GuardMiddleware:
    """Refuses unsafe ids (400) and oversized bodies (413) before any route runs.
    ``upload_limit()`` gives the byte limit (None: no limit); by default the running app's."""

    def __init__(self, app, upload_limit=None):
        self.app = app
        self.upload_limit = upload_limit or _upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for segment in scope["path"].split("/"):
            if segment == ".." or "\\" in segment:
                return await _send_json(send, 400, "the request path contains '..' or '\\'")
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in ID_PARAMS and value:
                reason = unsafe_id_reason(value)
                if reason:
                    return await _send_json(send, 400, f"{key} {value[:80]!r} {reason}; ids are plain names without '/' or '..'")
        limit = self.upload_limit() if scope["method"] in ("POST", "PUT", "PATCH") else None
        if limit is None:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"the upload is larger than this server accepts ({limit // (1024 * 1024)} MB, --conf max_upload_mb)"
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, too_big)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(status_code=413, detail=too_big)
            return message

        return await self.app(scope, counted, send)


def _fix_token_check() -> None:
    """MONAI Label 0.8.5 decodes tokens with PyJWT without naming the algorithms, which PyJWT 2
    refuses: with auth on, every token, valid or not, is rejected with 401. This replaces its
    ``from_token`` by the same check with the algorithms named (HLIP_AUTH_ALGORITHMS, default
    RS256, Keycloak's)."""
    import jwt
    from monailabel.endpoints.user import auth

    if getattr(auth.from_token, "hlip_fixed", False):
        return
    algorithms = [a.strip() for a in os.environ.get("HLIP_AUTH_ALGORITHMS", "RS256").split(",") if a.strip()]

    def from_token(token: str):
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return auth.DEFAULT_USER
        key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
        payload = jwt.decode(token, key, algorithms=algorithms, options={"verify_signature": True, "verify_aud": False, "verify_exp": True,
                                                                     "require": ["exp"]})  # a token without exp would never expire
        roles = payload
        for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        return auth.User(username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
                         email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                         name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=roles or [])

    from_token.hlip_fixed = True
    auth.from_token = from_token


def cors_origins(conf: dict) -> list[str]:
    """The origins ``--conf cors_origins`` allows (comma separated; empty: same origin only)."""
    origins = [o.strip().rstrip("/") for o in str(conf.get("cors_origins", "")).split(",") if o.strip()]
    for o in origins:
        if o == "*" or not o.startswith(("http://", "https://")):
            raise ValueError(f"--conf cors_origins lists {o[:80]!r}; give each allowed origin as http(s)://host[:port], never '*'")
    return origins


def _same_origin_cors(app) -> None:
    """MONAI Label allows every origin, with credentials, when MONAI_LABEL_CORS_ORIGINS is empty: any
    web page open in the user's browser could then read scans. Replace that by ``--conf cors_origins``
    (none by default: same origin only)."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    origins = cors_origins(settings.MONAI_LABEL_APP_CONF or {})
    app.user_middleware[:] = [m for m in app.user_middleware if getattr(m, "cls", None) is not CORSMiddleware]
    if origins:
        app.user_middleware.insert(0, Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True,
                                                 allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
                                                 allow_headers=["authorization", "content-type"]))


def install(app) -> None:
    """Put the HLIP routes, guards and error handlers on MONAI Label's FastAPI ``app`` (once)."""
    if getattr(app.state, "hlip_installed", False):
        return
    import requests

    # our routes go first: for the paths and methods they share with MONAI Label's (REPLACED), ours match
    routers = [router] if settings.MONAI_LABEL_STUDIES.startswith(("http://", "https://")) else [router, no_proxy]
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        routers.append(no_logs)
    for r in routers:
        app.include_router(r, prefix=settings.MONAI_LABEL_API_STR)
        app.router.routes.insert(0, app.router.routes.pop())
    mark_changed = getattr(app.router, "_mark_routes_changed", None)  # FastAPI >= 0.16x caches the route tree
    if mark_changed is not None:
        mark_changed()
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(MONAILabelException, on_monailabel_error)
    app.add_exception_handler(requests.RequestException, on_upstream_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_any_error)
    app.add_middleware(TempSweepMiddleware)  # inside the guard: sees every upload the guard lets through
    app.add_middleware(GuardMiddleware)
    _same_origin_cors(app)
    if settings.MONAI_LABEL_AUTH_ENABLE:
        _fix_token_check()

    stock_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with stock_lifespan(a) as state:
            yield state
        for instance in list(apps.values()):  # stop the worker and the indexer, then forget the app
            stop = getattr(instance, "hlip_shutdown", None)
            if stop is not None:
                stop()
        clear_cache()

    app.router.lifespan_context = lifespan
    app.state.hlip_installed = True
