"""Turn a released HLIP checkpoint (the authors' open_clip .pt file) into a checkpoint folder that
train/evaluate.py, train/predict.py and the MONAI Label server load.

    python train/import_checkpoint.py hlip_brainmri.pt --config vit_base_multiscan_h2_token1176 \
        --text-folder path/to/BiomedBERT --out checkpoints/hlip-brainmri

The .pt file is read with torch.load(weights_only=True) (no pickled code runs) and mapped by name;
keys that do not fit the configuration are listed. The released files carry no tokenizer: give the
local folder of the text model it was trained with (BiomedBERT for brain MRI / head CT, CXR-BERT's
tokenizer for chest CT), or the folder is written without one (studies can be embedded, text not).
The preprocessing settings written with it (model grid = the configuration's scan size, CT window,
MRI percentiles) are this project's; the authors' own pipeline differs in details, so check the
imported model on labelled studies of your own before trusting its numbers.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the released .pt (or .safetensors) file")
    p.add_argument("--config", required=True, help="the configuration it was trained with, e.g. vit_base_multiscan_h2_token1176")
    p.add_argument("--text-folder", default=None, help="local Hugging Face folder of its text model, for the tokenizer (default: none)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="Hounsfield window for CT scans (default: the project's, -1150 350)")
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="intensity percentiles for MRI and other scans (default: 0.5 99.5)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import hlip_core
    from hlip_core.data import PreprocessSettings

    model = hlip_core.load_official_checkpoint(args.checkpoint, args.config, text_folder=args.text_folder)
    settings = {"target_shape": tuple(model.config["vision"]["img_size"])}
    if args.ct_window:
        settings["ct_window"] = tuple(args.ct_window)
    if args.percentiles:
        settings["percentiles"] = tuple(args.percentiles)
    model.config["preprocess"] = PreprocessSettings(**settings).to_dict()
    folder = hlip_core.save(model, args.out, extra={"imported_from": str(args.checkpoint)})
    tokenizer = "with its tokenizer" if model.tokenizer is not None else "without a tokenizer (give --text-folder to ask findings)"
    print(f"{args.config} written to {folder} {tokenizer}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"import_checkpoint: {exc}")
