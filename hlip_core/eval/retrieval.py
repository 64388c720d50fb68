"""An on-disk embedding index of studies: exact search by one matrix product.

Layout of an index folder: ``embeddings.npy`` (float16, [n, E], L2-normalised rows, memory-mapped
when read) and ``ids.json`` (the study ids in row order). float16 halves the memory traffic of a
query, which is what bounds it: one text query over a million studies of width 512 reads 1 GB.
The top candidates are re-scored in float32; scores are cosines to the stored float16 vectors
(within about 1e-3 of the float32 embeddings').

For many millions of studies an optional approximate backend (``build_ivf``) clusters the rows
(spherical k-means) into inverted lists; a query then reads only the ``nprobe`` lists whose
centroids are nearest (``ivf.npz`` beside the index; ``search(..., nprobe=...)``). Exact search stays
the default.
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
IVF = "ivf.npz"


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
        self.ivf: dict[str, np.ndarray] | None = None  # centroids [L, E], order [n], offsets [L + 1]

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
        if self.ivf is not None:
            np.savez(folder / f".{IVF}.{tag}.npz", **self.ivf)
        elif (folder / IVF).exists():
            os.remove(folder / IVF)  # lists of other rows would mislead the new index
        os.replace(folder / f".{EMB}.{tag}.npy", folder / EMB)
        os.replace(folder / f".{IDS}.{tag}", folder / IDS)
        if self.ivf is not None:
            os.replace(folder / f".{IVF}.{tag}.npz", folder / IVF)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True) -> "EmbeddingIndex":
        folder = Path(folder)
        if not (folder / EMB).is_file() or not (folder / IDS).is_file():
            raise FileNotFoundError(f"no embedding index in {folder} ({EMB} and {IDS} expected)")
        # copy-on-write mapping: torch can wrap it without a copy, and the file is never written
        emb = np.load(folder / EMB, mmap_mode="c" if mmap else None)
        index = cls(emb, json.loads((folder / IDS).read_text()))
        if (folder / IVF).is_file():
            with np.load(folder / IVF, allow_pickle=False) as data:
                ivf = {k: data[k] for k in ("centroids", "order", "offsets")}
            if int(ivf["offsets"][-1]) == len(index):
                index.ivf = ivf
        return index

    def build_ivf(self, lists: int | None = None, iters: int = 10, sample: int = 100_000, seed: int = 0, chunk: int = 262144) -> None:
        """Cluster the rows into ``lists`` inverted lists (default about sqrt(n)) for approximate
        search: spherical k-means on a sample of at most ``sample`` rows, then every row to its
        nearest centroid. Saved with the index by ``save``."""
        n = len(self)
        lists = int(lists or max(1, round(np.sqrt(n))))
        if not 1 <= lists <= n:
            raise ValueError(f"cannot make {lists} lists of {n} studies")
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(n, size=min(n, max(sample, lists)), replace=False))
        data = torch.from_numpy(np.asarray(self.embeddings[pick], dtype=np.float32))
        centroids = data[torch.from_numpy(rng.choice(len(data), size=lists, replace=False))].clone()
        for _ in range(iters):
            assign = (data @ centroids.T).argmax(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, data)
            empty = torch.bincount(assign, minlength=lists) == 0
            sums[empty] = data[torch.randint(len(data), (int(empty.sum()),))]  # re-seed lists that lost every row
            centroids = torch.nn.functional.normalize(sums, dim=-1)
        c16 = centroids.to(torch.float16)
        assign = np.empty(n, dtype=np.int64)
        for start in range(0, n, chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start : start + chunk]))
            assign[start : start + len(block)] = (block @ c16.T).float().argmax(dim=1).numpy()
        order = np.argsort(assign, kind="stable")
        offsets = np.zeros(lists + 1, dtype=np.int64)
        np.cumsum(np.bincount(assign, minlength=lists), out=offsets[1:])
        self.ivf = {"centroids": centroids.numpy(), "order": order, "offsets": offsets}

    def vector(self, study_id: str) -> np.ndarray:
        if study_id not in self._row:
            raise KeyError(f"study {study_id!r} is not in the index")
        return np.asarray(self.embeddings[self._row[study_id]], dtype=np.float32)

    def search(self, queries, k: int = 10, exclude: list[str | None] | None = None, chunk: int = 262144,
               nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """queries: [q, E] (normalised inside). exclude: per query a study id to leave out (for
        study-to-study search). nprobe: search only the rows of the ``nprobe`` nearest inverted
        lists (approximate; needs ``build_ivf``); None = exact. Returns, per query, up to k
        (id, cosine) pairs, best first."""
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, dtype=np.float32)), dim=-1)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"queries must be [q, {self.embeddings.shape[1]}], got {tuple(q.shape)}")
        if nprobe is not None:
            return [self._search_ivf(q[i], k, exclude[i] if exclude else None, nprobe) for i in range(q.shape[0])]
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

    def _search_ivf(self, q: torch.Tensor, k: int, skip: str | None, nprobe: int) -> list[tuple[str, float]]:
        if self.ivf is None:
            raise ValueError("approximate search needs inverted lists: call build_ivf() (and save) first")
        centroids, order, offsets = self.ivf["centroids"], self.ivf["order"], self.ivf["offsets"]
        probe = np.argsort(-(centroids @ q.numpy()))[: max(1, nprobe)]
        rows = np.sort(np.concatenate([order[offsets[c] : offsets[c + 1]] for c in probe]))
        if len(rows) == 0:
            return []
        cos = np.asarray(self.embeddings[rows], dtype=np.float32) @ q.numpy()
        best = np.argsort(-cos, kind="stable")
        hits = [(self.ids[rows[j]], float(cos[j])) for j in best[: k + 1] if self.ids[rows[j]] != skip]
        return hits[:k]
