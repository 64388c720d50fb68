"""Turn a released HLIP model into a checkpoint folder that train/evaluate.py, train/predict.py and
the MONAI Label server load.

A released Hugging Face folder (open_clip_config.json, model.safetensors / pytorch_model.bin,
tokenizer files) names its own architecture and carries its tokenizer: no other option is needed.

    python train/import_checkpoint.py hlip-2025-10-08/ checkpoints/hlip-2025-10-08

Its vendored code (hlip/, model_configs/) is never imported; the weights are read from the
safetensors file (the .bin only with torch.load(weights_only=True)) and every tensor is checked. The
checkpoint records the released preprocessing preset.

A June-2025 .pt file needs the configuration it was trained with (--config) and, for a tokenizer, the
local folder of its text model (--text-folder):

    python train/import_checkpoint.py hlip_brainmri.pt checkpoints/hlip-brainmri \
        --config vit_base_multiscan_h2_token1176 --text-folder path/to/BiomedBERT

The .pt file is read with torch.load(weights_only=True) (no pickled code runs) and mapped by name;
keys that do not fit the configuration are listed. Without --text-folder the folder is written
without a tokenizer (studies can be embedded, text not). The preprocessing settings written with a
.pt import (model grid = the configuration's scan size, CT window, MRI percentiles) are this
project's; the authors' own pipeline differs in details, so check the imported model on labelled
studies of your own before trusting its numbers.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a released Hugging Face folder (open_clip_config.json, weights, tokenizer) "
                                      "or a June-2025 .pt (or .safetensors) file")
    p.add_argument("out_folder", nargs="?", default=None, metavar="OUT", help="checkpoint folder to write (or --out)")
    p.add_argument("--out", default=None, help="checkpoint folder to write (same as OUT)")
    p.add_argument("--config", default=None, help="for a .pt file (required there): the configuration it was trained with, "
                                                  "e.g. vit_base_multiscan_h2_token1176; a released folder names its own")
    p.add_argument("--text-folder", default=None, help="local Hugging Face folder of its text model, for the tokenizer "
                                                       "(default: a released folder's own tokenizer files; none for a .pt file)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="Hounsfield window for CT scans (default: the project's, -1150 350)")
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="intensity percentiles for MRI and other scans (default: 0.5 99.5; .pt files only)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.out_folder is None) == (args.out is None):
        p.error("give the checkpoint folder to write once: OUT or --out")
    args.out = args.out or args.out_folder
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import hlip_core
    from hlip_core.data import PreprocessSettings
    from hlip_core.model.released import is_released_folder

    released = is_released_folder(args.checkpoint)
    if released and (args.ct_window or args.percentiles):
        raise ValueError("a released folder carries its own preprocessing preset: --ct-window and --percentiles are for .pt files")
    model = hlip_core.load_official_checkpoint(args.checkpoint, args.config, text_folder=args.text_folder)
    name = model.config["name"]
    if released:  # the loader recorded the released preset
        return _write(model, args, name)
    settings = {"target_shape": tuple(model.config["vision"]["img_size"])}
    if args.ct_window:
        settings["ct_window"] = tuple(args.ct_window)
    if args.percentiles:
        settings["percentiles"] = tuple(args.percentiles)
    model.config["preprocess"] = PreprocessSettings(**settings).to_dict()
    return _write(model, args, name)


def _write(model, args, name: str) -> int:
    import hlip_core

    # the source's name only: a local path would leak into every copy of the checkpoint
    folder = hlip_core.save(model, args.out, extra={"imported_from": Path(args.checkpoint).name})
    tokenizer = "with its tokenizer" if model.tokenizer is not None else "without a tokenizer (give --text-folder to ask findings)"
    print(f"{name} written to {folder} {tokenizer}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"import_checkpoint: {exc}")
