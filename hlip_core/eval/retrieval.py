"""An on-disk embedding index of studies: exact search by one matrix product, approximate by FAISS.

Layout of an index folder: ``embeddings.npy`` (float16, [n, E], L2-normalised rows, memory-mapped
when read) and ``ids.json`` (the study ids in row order). float16 halves the memory traffic of a
query, which is what bounds it: one text query over a million studies of width 512 reads 1 GB.
The top candidates are re-scored in float32; scores are cosines to the stored float16 vectors
(within about 1e-3 of the float32 embeddings').

Exact search is the default and is fast enough below ``APPROXIMATE_FROM`` rows (see
benchmarks/RESULTS.md, "Approximate search with FAISS"). Past it, ``build_ann`` makes a FAISS
IVF-SQ8 index (inverted lists over 8-bit scalar-quantised rows, inner product on the normalised rows
= cosine); ``faiss.index`` and its side file ``faiss.json`` (kind, dim, count, embedding kind, build
parameters, a digest of the ids) are written beside the index. A search then reads only the
``nprobe`` nearest lists and re-scores its candidates exactly against the float16 rows, so scores
are the same cosines exact search gives. FAISS row numbers are the rows of ``ids.json``. An
``ivf.npz`` of the earlier home-made inverted lists is ignored (logged) and removed at the next save.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

EMB = "embeddings.npy"
IDS = "ids.json"
ANN = "faiss.index"
ANN_PARAMS = "faiss.json"
OLD_IVF = "ivf.npz"  # home-made inverted lists of earlier versions: ignored, removed at the next save
STATE = "export.json"  # written by hlip_core.eval.embedding: names the embedding kind of the rows
ANN_KIND = "IVF-SQ8"
RERANK = 8  # candidates per wanted hit the approximate search re-scores exactly: 8 x max(4k, 32)
NPROBE = 16  # default inverted lists an approximate search reads
APPROXIMATE_FROM = 2_000_000  # rows from which exact search is slower than the approximate index is worth


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_ann(folder: Path, index: "EmbeddingIndex"):
    """(faiss index, parameters) of ``folder``, checked against ``index``'s rows; ValueError if not usable."""
    import faiss

    path, side = folder / ANN, folder / ANN_PARAMS
    fix = "rebuild it (EmbeddingIndex.build_ann + save, or train/embed.py --approximate) or delete both files"
    if not (path.is_file() and side.is_file()):
        raise ValueError(f"{folder}: {ANN} and {ANN_PARAMS} go together, only one is there; {fix}")
    try:
        params = json.loads(side.read_text())
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{side} is not a readable FAISS side file ({e}); {fix}") from None
    try:
        ann = faiss.read_index(str(path))
    except RuntimeError:  # faiss reports a bad file as a RuntimeError carrying C++ source paths: not shown
        raise ValueError(f"{path} is not a readable FAISS index (truncated or not written by faiss); {fix}") from None
    n, dim = index.embeddings.shape
    state = folder / STATE
    want = json.loads(state.read_text()).get("embedding") if state.is_file() else None
    problems = [f"{what} {got} but the index has {has}" for what, got, has in (
        ("kind", params.get("kind"), ANN_KIND), ("dim", params.get("dim"), dim), ("FAISS width", ann.d, dim),
        ("count", params.get("count"), n), ("FAISS rows", ann.ntotal, n)) if got != has]
    if params.get("ids") != _ids_digest(index.ids):
        problems.append("it was built for other study ids")
    if want is not None and params.get("embedding") not in (None, want):
        problems.append(f"embedding {params.get('embedding')!r} but {STATE} says {want!r}")
    if problems:
        raise ValueError(f"{path} does not match the embeddings beside it ({'; '.join(problems)}); {fix}")
    return ann, {k: v for k, v in params.items() if k != "ids"}


class EmbeddingIndex:
    """Study embeddings with their ids; ``search(queries, k)`` -> list of [(study_id, cosine), ...]."""

    def __init__(self, embeddings: np.ndarray, ids: list[str]):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
        self.embeddings = embeddings
        self.ids = list(ids)
        self._row = {sid: i for i, sid in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("study ids in an index must be unique")
        self.ann = None  # a trained faiss IVF-SQ8 index holding every row (row number = FAISS id), or None
        self.ann_params: dict | None = None  # faiss.json: kind, dim, count, embedding, lists, sample, seed, nprobe

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, embeddings, ids: list[str]) -> "EmbeddingIndex":
        e = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        e = torch.nn.functional.normalize(e, dim=-1)
        return cls(e.numpy().astype(np.float16), ids)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index atomically (files renamed into place), with its FAISS index if built."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        np.save(folder / f".{EMB}.{tag}.npy", np.ascontiguousarray(self.embeddings, dtype=np.float16))
        (folder / f".{IDS}.{tag}").write_text(json.dumps(self.ids))
        (folder / OLD_IVF).unlink(missing_ok=True)
        if self.ann is None:  # a FAISS index of other rows would mislead the new one (load checks too)
            for name in (ANN, ANN_PARAMS):
                (folder / name).unlink(missing_ok=True)
        os.replace(folder / f".{EMB}.{tag}.npy", folder / EMB)
        os.replace(folder / f".{IDS}.{tag}", folder / IDS)
        if self.ann is not None:
            self.save_ann(folder)
        return folder

    def save_ann(self, folder: str | os.PathLike) -> None:
        """Write only the FAISS index (``faiss.index``) and its side file (``faiss.json``: kind, dim,
        count, embedding kind, build parameters, a digest of the ids) into ``folder``, atomically,
        beside embeddings.npy/ids.json of the same rows."""
        import faiss

        if self.ann is None:
            raise ValueError("no approximate index to save: call build_ann() first")
        folder = Path(folder)
        tag = uuid.uuid4().hex[:8]
        faiss.write_index(self.ann, str(folder / f".{ANN}.{tag}"))
        (folder / f".{ANN_PARAMS}.{tag}").write_text(json.dumps({**self.ann_params, "ids": _ids_digest(self.ids)}))
        os.replace(folder / f".{ANN}.{tag}", folder / ANN)
        os.replace(folder / f".{ANN_PARAMS}.{tag}", folder / ANN_PARAMS)

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True, approximate: bool = True) -> "EmbeddingIndex":
        """Read an index folder (embeddings memory-mapped unless ``mmap=False``) and, unless
        ``approximate=False``, its FAISS index. A FAISS index that cannot be read, or that was built
        for other rows, another width or another embedding kind than the folder's export.json names,
        is a ValueError naming the file and the mismatch (rebuild it, or load with approximate=False)."""
        folder = Path(folder)
        if not (folder / EMB).is_file() or not (folder / IDS).is_file():
            raise FileNotFoundError(f"no embedding index in {folder} ({EMB} and {IDS} expected)")
        # copy-on-write mapping: torch can wrap it without a copy, and the file is never written
        emb = np.load(folder / EMB, mmap_mode="c" if mmap else None)
        index = cls(emb, json.loads((folder / IDS).read_text()))
        if (folder / OLD_IVF).is_file():
            log.info("%s: ignoring %s (inverted lists of an earlier version; approximate search is now FAISS: "
                     "rebuild with build_ann or train/embed.py --approximate)", folder, OLD_IVF)
        if approximate and ((folder / ANN).is_file() or (folder / ANN_PARAMS).is_file()):
            index.ann, index.ann_params = _read_ann(folder, index)
        return index

    def build_ann(self, lists: int | None = None, sample: int | None = None, seed: int = 0, nprobe: int = NPROBE,
                  embedding: str | None = None, like=None, chunk: int = 262144) -> None:
        """Build the approximate FAISS index of every row: IVF-SQ8 (``lists`` inverted lists,
        default about sqrt(n); each row stored as 8-bit scalar-quantised codes, E bytes), inner
        product = cosine on the normalised rows. The coarse quantiser is trained on ``sample`` rows
        (default 40 per list, at least 10,000) drawn with ``seed``, so the same rows give the same
        index; rows are added ``chunk`` at a time. ``nprobe``: lists a search reads by default.
        ``embedding``: the embedding kind ("reports"/"findings"), recorded in faiss.json.
        ``like``: an EmbeddingIndex whose trained index is reused (only the rows are added again,
        keeping its lists and training) when its width matches and it was trained on at least half as many
        rows. IVF-SQ8 was chosen by measurement (benchmarks/RESULTS.md, "Approximate search with
        FAISS"): with this build of faiss-cpu, PQ codes trained and encoded 5-50x slower for no gain
        in recall after the exact re-scoring. Saved with the index by ``save`` (or alone by ``save_ann``)."""
        import faiss

        n, dim = self.embeddings.shape
        if like is not None and like.ann is not None and like.ann.d == dim and 2 * like.ann_params["trained_rows"] >= n:
            ann = faiss.clone_index(like.ann)
            ann.reset()
            params = {**like.ann_params, "nprobe": int(nprobe), "embedding": embedding or like.ann_params.get("embedding")}
        else:
            lists = int(lists or max(1, round(np.sqrt(n))))
            sample = int(min(n, sample or max(10_000, 40 * lists)))
            if not 1 <= lists <= sample:
                raise ValueError(f"cannot make {lists} inverted lists from {n} studies (sample {sample}): "
                                 "give fewer lists or search exactly")
            ann = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
            ann.cp.seed = seed
            rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
            ann.train(np.ascontiguousarray(self.embeddings[rows], dtype=np.float32))
            params = {"kind": ANN_KIND, "dim": dim, "lists": lists, "sample": sample, "seed": seed, "trained_rows": n,
                      "nprobe": int(nprobe), "embedding": embedding}
        for start in range(0, n, chunk):
            ann.add(np.ascontiguousarray(self.embeddings[start : start + chunk], dtype=np.float32))
        self.ann = ann
        self.ann_params = {**params, "count": n}

    def vector(self, study_id: str) -> np.ndarray:
        if study_id not in self._row:
            raise KeyError(f"study {study_id!r} is not in the index")
        return np.asarray(self.embeddings[self._row[study_id]], dtype=np.float32)

    def search(self, queries, k: int = 10, exclude: list[str | None] | None = None, chunk: int = 262144,
               approximate: bool | None = None, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """queries: [q, E] (normalised inside). exclude: per query a study id to leave out (for
        study-to-study search). approximate: None = use the FAISS index when one is built, else
        exact; True = the FAISS index (an error without one); False = exact. nprobe: inverted lists
        the approximate search reads (default: the one it was built with). Returns, per query, up to
        k (id, cosine) pairs, best first (fewer when the index holds fewer rows)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float32)), dim=-1)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be [q, {self.embeddings.shape[1]}], got {tuple(q.shape)}")
        if approximate and self.ann is None:
            raise ValueError("approximate search needs a FAISS index: call build_ann() (and save) first")
        k_fetch = min(len(self), k + 1 if exclude else k)
        cand_k = min(len(self), max(4 * k_fetch, 32))
        if self.ann is not None and approximate is not False:
            self.ann.nprobe = int(nprobe or self.ann_params["nprobe"])
            # codes rank coarsely: re-score RERANK x more candidates than exact search needs
            _, cand = self.ann.search(np.ascontiguousarray(q.numpy()), min(len(self), RERANK * cand_k))  # [q, cand_k] rows, -1 = none
            cand = torch.from_numpy(cand)
        else:
            cand = self._exact_candidates(q, cand_k, chunk)
        out = []
        for qi in range(q.shape[0]):
            rows = np.unique(cand[qi].numpy())
            rows = rows[rows >= 0]
            cos = np.asarray(self.embeddings[rows], dtype=np.float32) @ q[qi].numpy()
            order = np.argsort(-cos, kind="stable")
            skip = exclude[qi] if exclude else None
            hits = [(self.ids[rows[j]], float(cos[j])) for j in order if self.ids[rows[j]] != skip]
            out.append(hits[:k])
        return out

    def _exact_candidates(self, q: torch.Tensor, cand_k: int, chunk: int) -> torch.Tensor:
        """Rows [q, cand_k] of the best float16 scores over every row, chunk by chunk."""
        q16 = q.to(torch.float16)
        best_s, best_i = [], []
        for start in range(0, len(self), chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start : start + chunk]))
            s = (block @ q16.T).T.float()  # [q, chunk]
            v, i = torch.topk(s, min(cand_k, s.shape[1]), dim=1)
            best_s.append(v)
            best_i.append(i + start)
        cand = torch.cat(best_i, dim=1)
        top = torch.topk(torch.cat(best_s, dim=1), cand_k, dim=1).indices
        return torch.gather(cand, 1, top)
