"""An on-disk embedding index of studies: exact search by one matrix product.

Layout of an index folder: ``embeddings.npy`` (float16, [n, E], L2-normalised rows, memory-mapped
when read) and ``ids.json`` (the study ids in row order). float16 halves the memory traffic of a
query, which is what bounds it: one text query over a million studies of width 512 reads 1 GB.
The top candidates are re-scored in float32; scores are cosines to the stored float16 vectors
(within about 1e-3 of the float32 embeddings').
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

EMB = "embeddings.npy"
IDS = "ids.json"


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

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, embeddings, ids: list[str]) -> "EmbeddingIndex":
        e = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        e = torch.nn.functional.normalize(e, dim=-1)
        return cls(e.numpy().astype(np.float16), ids)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index atomically (files renamed into place)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        np.save(folder / f".{EMB}.{tag}.npy", np.ascontiguousarray(self.embeddings, dtype=np.float16))
        (folder / f".{IDS}.{tag}").write_text(json.dumps(self.ids))
        os.replace(folder / f".{EMB}.{tag}.npy", folder / EMB)
        os.replace(folder / f".{IDS}.{tag}", folder / IDS)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True) -> "EmbeddingIndex":
        folder = Path(folder)
        if not (folder / EMB).is_file() or not (folder / IDS).is_file():
            raise FileNotFoundError(f"no embedding index in {folder} ({EMB} and {IDS} expected)")
        # copy-on-write mapping: torch can wrap it without a copy, and the file is never written
        emb = np.load(folder / EMB, mmap_mode="c" if mmap else None)
        return cls(emb, json.loads((folder / IDS).read_text()))

    def vector(self, study_id: str) -> np.ndarray:
        if study_id not in self._row:
            raise KeyError(f"study {study_id!r} is not in the index")
        return np.asarray(self.embeddings[self._row[study_id]], dtype=np.float32)

    def search(self, queries, k: int = 10, exclude: list[str | None] | None = None, chunk: int = 262144) -> list[list[tuple[str, float]]]:
        """queries: [q, E] (normalised inside). exclude: per query a study id to leave out (for
        study-to-study search). Returns, per query, up to k (id, cosine) pairs, best first."""
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float32)), dim=-1)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be [q, {self.embeddings.shape[1]}], got {tuple(q.shape)}")
        k_fetch = min(len(self), k + 1 if exclude else k)
        cand_k = min(len(self), max(4 * k_fetch, 32))
        q16 = q.to(torch.float16)
        best_s, best_i = [], []
        for start in range(0, len(self), chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start : start + chunk]))
            s = (block @ q16.T).T.float()  # [q, chunk]
            kk = min(cand_k, s.shape[1])
            v, i = torch.topk(s, kk, dim=1)
            best_s.append(v)
            best_i.append(i + start)
        cand = torch.cat(best_i, dim=1)
        scores = torch.cat(best_s, dim=1)
        top = torch.topk(scores, min(cand_k, scores.shape[1]), dim=1).indices
        cand = torch.gather(cand, 1, top)
        out = []
        for qi in range(q.shape[0]):
            rows = cand[qi].numpy()
            exact = np.asarray(self.embeddings[np.sort(rows)], dtype=np.float32)
            exact_rows = np.sort(rows)
            cos = exact @ q[qi].numpy()
            order = np.argsort(-cos, kind="stable")
            skip = exclude[qi] if exclude else None
            hits = [(self.ids[exact_rows[j]], float(cos[j])) for j in order if self.ids[exact_rows[j]] != skip]
            out.append(hits[:k])
        return out
