"""Small random models written the way released HLIP models are published on Hugging Face.

``write_released_folder(path, timm_model_name)`` builds an ``HLIPModel`` of that registry
configuration (text tower shrunk to a few thousand weights, one head per 64 channels as BERT has and
the loader assumes), perturbs every weight, and writes:
``open_clip_config.json``, ``model.safetensors`` and ``pytorch_model.bin`` (one state dict with
open_clip key names, BERT's pooler and ``position_ids`` included, a dual model's report temperature
as ``logit_bias``), the tokenizer files, and a vendored ``hlip/`` + ``model_configs/`` whose import
would write a marker file and raise. It returns the writer's model, the reference for equality.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import hlip_core
from hlip_core.model import ReportTokenizer, get_config

WORDS = ("no", "acute", "intracranial", "haemorrhage", "mass", "effect", "midline", "shift", "this", "study",
         "shows", "normal", "brain", "mri", "identified", "infarct", "tumour", "oedema", "and", ".", ":", ",")
TRAP_MARKER = "VENDORED_CODE_RAN"


def _write_tokenizer(folder: Path, context_length: int) -> ReportTokenizer:
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=context_length)
    tok.save_pretrained(str(folder))  # tokenizer.json, tokenizer_config.json (vocab.txt stays)
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))  # open_clip's save_for_hf writes one too
    return ReportTokenizer(tok, context_length)


def _write_trap(folder: Path, timm_model_name: str) -> None:
    code = (f"import pathlib\npathlib.Path(__file__).resolve().parent.parent.joinpath({TRAP_MARKER!r}).write_text('imported')\n"
            "raise RuntimeError('the vendored hlip package of a released folder was imported')\n")
    for sub in ("hlip", "model_configs"):
        (folder / sub).mkdir()
    (folder / "hlip" / "__init__.py").write_text(code)
    (folder / "hlip" / "visual_encoder.py").write_text(code)
    (folder / "model_configs" / f"{timm_model_name}.json").write_text(json.dumps({"vision_cfg": {"timm_model_name": timm_model_name}}))


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict under the names a released folder uses (open_clip's)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if "report_logit_scale" in state:
        state["logit_bias"] = state.pop("report_logit_scale")
    hidden = state["text.transformer.embeddings.word_embeddings.weight"].shape[1]
    positions = state["text.transformer.embeddings.position_embeddings.weight"].shape[0]
    gen = torch.Generator().manual_seed(7)
    state["text.transformer.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=gen)
    state["text.transformer.pooler.dense.bias"] = torch.randn(hidden, generator=gen)
    state["text.transformer.embeddings.position_ids"] = torch.arange(positions)[None]
    return state


def write_released_folder(path, timm_model_name: str, seed: int = 0, weights=("safetensors", "bin"), text_hidden: int = 32,
                          context_length: int = 256, report_temperature: float = 2.5):
    """Write a released-format folder at ``path``; returns the model whose weights it holds (eval mode).

    weights: which weight files to write ("safetensors", "bin"). report_temperature: the dual
    model's report log temperature (its ``logit_bias``)."""
    folder = Path(path)
    folder.mkdir(parents=True)
    tokenizer = _write_tokenizer(folder, context_length)
    cfg = get_config(timm_model_name)
    cfg["text"].update(hidden=text_hidden, layers=2, heads=max(1, text_hidden // 64), intermediate=2 * text_hidden, vocab_size=len(tokenizer),
                       max_positions=context_length, context_length=context_length)
    torch.manual_seed(seed)
    model = hlip_core.HLIPModel(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # no zero biases: a wrong mapping must show
        if model.report_logit_scale is not None:
            model.report_logit_scale.fill_(report_temperature)
    state = released_state_dict(model)
    if "safetensors" in weights:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    if "bin" in weights:
        torch.save(state, folder / "pytorch_model.bin")
    model_cfg = {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": {"timm_model_name": timm_model_name, "timm_model_pretrained": True, "timm_drop_path": 0.2,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
                     "hf_tokenizer_name": "Zch0414/hlip-test", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "hf_proj_type": "linear", "context_length": context_length},
    }
    if model.report_logit_scale is not None:
        model_cfg["init_logit_bias"] = 2.659260036932778
    preprocess_cfg = {"size": list(cfg["vision"]["img_size"]), "mean": [0.449], "std": [0.226]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    _write_trap(folder, timm_model_name)
    return model.eval()
