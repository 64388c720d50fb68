"""Zero-shot findings: free-text prompts scored against study embeddings.

Binary findings compare a positive and a negative prompt ("X" vs "no X"), with a softmax over the pair
as in the HLIP paper; the raw cosine scores (positive minus negative) are returned too. Each side may
be one phrasing or several ("intraparenchymal haemorrhage" and "intracerebral haemorrhage"), and each
phrasing may be put in several templates ("{}.", "The study shows {}."): the side's embedding is the
mean of all of them, as in CLIP's prompt ensembles, which depends less on any one wording.
Multi-class prompt sets (one prompt per class, e.g. Pub-Brain-5) take a softmax over the classes.

Prompt sets of the public benchmarks are JSON files in ``prompts/`` (see ``load_prompt_set``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_FINDING_CHARS = 300


@dataclass
class Finding:
    """One finding to score. ``positive`` and ``negative`` are a phrasing or a tuple of phrasings
    (an ensemble, averaged); ``negative`` is None for the classes of a multi-class set."""

    name: str
    positive: str | tuple[str, ...]
    negative: str | tuple[str, ...] | None = None
    column: str | None = None


def _prompt(value, finding: str, side: str, source) -> str | tuple[str, ...] | None:
    """A prompt set's positive/negative entry: a string, or a non-empty list of strings."""
    if value is None and side == "negative":
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value[0] if len(value) == 1 else tuple(value)
    raise ValueError(f"prompt set {source}: finding {finding!r} has a {side} prompt of {value!r}; "
                     "give a phrasing or a non-empty list of phrasings")


@dataclass
class PromptSet:
    name: str
    findings: list[Finding]
    templates: list[str] = field(default_factory=lambda: ["{}."])
    mode: str = "binary"
    id_column: str | None = None
    description: str = ""
    readers: list[str] | None = None


def benchmark_names() -> list[str]:
    folder = resources.files(__package__) / "prompts"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """A benchmark's prompt set by name (``ct-rate``, ``rad-chestct``, ``pub-brain-5``, ``cq500``,
    ``rsna-ich``) or from a JSON file of the same shape."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
    else:
        if str(name_or_path) not in benchmark_names():
            raise KeyError(f"unknown prompt set {name_or_path!r}; known: {', '.join(benchmark_names())} (or a .json file)")
        data = json.loads((resources.files(__package__) / "prompts" / f"{name_or_path}.json").read_text())
    findings = [Finding(f["name"], _prompt(f.get("positive"), f["name"], "positive", name_or_path),
                        _prompt(f.get("negative"), f["name"], "negative", name_or_path), f.get("column", f["name"]))
                for f in data["findings"]]
    return PromptSet(data["name"], findings, data.get("templates", ["{}."]), data.get("mode", "binary"),
                     data.get("id_column"), data.get("description", ""), data.get("readers"))


def findings_from_text(names: list[str], negation: str = "no {}") -> list[Finding]:
    """Findings typed in free text: the positive prompt is the text, the negative ``no <text>``."""
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"finding {i} is empty; type the finding in words, e.g. 'intracranial haemorrhage'")
        name = " ".join(name.split())
        if len(name) > MAX_FINDING_CHARS:
            raise ValueError(f"finding {i} is {len(name)} characters long; the limit is {MAX_FINDING_CHARS}")
        out.append(Finding(name, name, negation.format(name)))
    return out


class ZeroShotClassifier:
    """Scores findings for study embeddings with a model's text tower; prompt embeddings are cached.

    ``scores(study_embeddings [B, E] normalised, findings)`` -> dict with
    ``probability`` [B, F] (softmax over the positive/negative pair, or over the classes) and
    ``cosine`` [B, F] (positive minus negative cosine; the positive cosine for classes).
    """

    def __init__(self, model, templates: list[str] | None = None, cache_size: int = 4096):
        self.model = model
        self.templates = list(templates) if templates else ["{}."]
        self._cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    @torch.no_grad()
    def embed_prompts(self, texts: list[str | tuple[str, ...]]) -> torch.Tensor:
        """Normalised text embeddings [len(texts), E], cached per prompt. A prompt is a phrasing or
        a tuple of phrasings; its embedding is the normalised mean over its phrasings and the
        templates."""
        prompts = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
        if any(not p for p in prompts):
            raise ValueError("an empty ensemble of phrasings was given as a prompt")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            filled = [tpl.format(t) for p in missing for t in p for tpl in self.templates]
            z = F.normalize(self.model.encode_text(filled).float(), dim=-1)
            sizes = [len(p) * len(self.templates) for p in missing]
            z = torch.stack([F.normalize(part.mean(dim=0), dim=-1) for part in z.split(sizes)]).cpu()
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(missing, z))
        return torch.stack([self._cache[p] for p in prompts])

    @torch.no_grad()
    def scores(self, study_embeddings: torch.Tensor, findings: list[Finding], mode: str = "binary") -> dict[str, torch.Tensor]:
        z = F.normalize(study_embeddings.float().cpu(), dim=-1)
        scale = float(self.model.logit_scale.exp())
        pos = self.embed_prompts([f.positive for f in findings])
        if mode == "multiclass":
            cos = z @ pos.T
            return {"probability": (scale * cos).softmax(dim=-1), "cosine": cos}
        if any(f.negative is None for f in findings):
            raise ValueError("binary findings need a negative prompt each")
        neg = self.embed_prompts([f.negative for f in findings])
        cos_pos, cos_neg = z @ pos.T, z @ neg.T
        pair = torch.stack([cos_pos, cos_neg], dim=-1) * scale
        return {"probability": pair.softmax(dim=-1)[..., 0], "cosine": cos_pos - cos_neg}
