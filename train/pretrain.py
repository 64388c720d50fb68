"""Language-image pre-training of an HLIP model on prepared studies (a manifest).

  python train/pretrain.py                      the embedded demo: builds demo brain MRI studies,
                                                trains a tiny model on the CPU, reports held-out AUC
  python train/pretrain.py --data PREPARED [--config tiny_multiscan_h2] [--out runs/mine] ...
                                                one process: the CPU or one GPU
  torchrun --nproc_per_node=G [--nnodes=N --node_rank=R --rdzv-endpoint=HOST:PORT] train/pretrain.py --data ...
                                                G processes per node with DistributedDataParallel
                                                (NCCL on GPUs, gloo on CPUs)
  ... --resume auto                             continue from the newest complete checkpoint in OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import types
import typing
from pathlib import Path

from hlip_core.training import TrainConfig

DEMO_FOLDER = "demo_output"


def _kind(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def build_parser() -> argparse.ArgumentParser:
    from hlip_core.demo import DEMO_TRAINING

    def as_flag(name, value):  # how the option is written on a command line (booleans are --x / --no-x)
        flag = "--" + name.replace("_", "-")
        return (flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag} {shlex.quote(str(value))}"

    demo = ", ".join(as_flag(k, v) for k, v in DEMO_TRAINING.items())
    parser = argparse.ArgumentParser(
        prog="train/pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The demo (no arguments, or --demo) writes its studies under --demo-folder and sets: {demo}; "
               "any option given beside --demo overrides these.",
    )
    parser.add_argument("--demo", action="store_true", help="run the embedded demo (the default without any argument)")
    parser.add_argument("--demo-folder", default=DEMO_FOLDER, help="demo: where the demo studies and the run go (default: %(default)s)")
    parser.add_argument("--demo-train-studies", type=int, default=None, help="demo: training studies to generate (default: the demo's own)")
    parser.add_argument("--demo-test-studies", type=int, default=None, help="demo: held-out studies to generate (default: the demo's own)")
    parser.add_argument("--verbose", action="store_true", help="debug messages in the console (default: off)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"] + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=json.loads, default=default, metavar="JSON", help=help_text)
        else:
            allowed = f.metadata.get("choices", ())
            choices = [c for c in allowed if c is not None] or None
            if choices and None in allowed:
                choices.append("none")  # back to unset, e.g. to switch off what the demo sets; parse() maps it to None
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        from hlip_core.demo import DEMO_TRAINING

        parser.set_defaults(**DEMO_TRAINING, out=str(Path(args.demo_folder) / "run"))
        args = parser.parse_args(argv)
    for f in dataclasses.fields(TrainConfig):
        if None in f.metadata.get("choices", ()) and getattr(args, f.name) == "none":
            setattr(args, f.name, None)
    return args


def config_from(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def setup_logging(out: Path, verbose: bool) -> None:
    from hlip_core.training import DistEnv

    env = DistEnv.from_env()
    out.mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO if env.is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if env.is_main else f"[rank {env.rank}] %(message)s"))
    logfile = logging.FileHandler(out / ("train.log" if env.is_main else f"train.rank{env.rank}.log"), encoding="utf-8")
    logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG, handlers=[console, logfile], force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "h5py", "nibabel"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_demo(args: argparse.Namespace) -> int:
    from hlip_core.demo import build_demo
    from hlip_core.training import DistEnv, format_auc_table, train
    from hlip_core.training.distributed import destroy_process_group

    env = DistEnv.from_env()
    folder = Path(args.demo_folder)
    sizes = {k: v for k, v in (("train_studies", args.demo_train_studies), ("test_studies", args.demo_test_studies)) if v}
    if env.distributed:
        # rank 0 builds the demo studies while the others wait; train() then uses this process group
        from hlip_core.training.distributed import barrier, init_process_group, pick_device

        init_process_group(env, pick_device(args.device, env))
        if env.is_main:
            build_demo(folder, **sizes)
        barrier(env)
    demo = build_demo(folder, **sizes)  # made once: a second call only finds it
    args.data, args.eval_data, args.eval_prompts = str(demo.train), str(demo.test), str(demo.prompts)
    try:
        result = train(config_from(args))
    finally:
        destroy_process_group()
    if env.is_main:
        print()
        if result.evaluation is not None:
            print(format_auc_table(result.evaluation, "Zero-shot findings on held-out demo studies the model never saw:"))
        print(f"\nmodel checkpoint:    {result.model_path.resolve()}")
        print(f"held-out studies:    {demo.test_studies.resolve()}  (NIfTI, one folder per study; labels in {demo.test_reports.name})")
        print(f"TensorBoard:         tensorboard --logdir {(Path(args.out) / 'tensorboard').resolve()}")
        print("\nServe them with MONAI Label:")
        print(f"monailabel start_server --app monailabel_app --studies {demo.test_studies.resolve()} "
              f"--conf checkpoint {result.model_path.resolve()} --uvicorn_app monailabel_app.asgi:app --host 127.0.0.1 --port 8000")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["--demo"]
    args = parse(argv)
    setup_logging(Path(args.out), args.verbose)
    from hlip_core.data.manifest import ManifestError
    from hlip_core.training import TrainingDiverged, train
    from hlip_core.training.checkpoint import CheckpointError
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            if args.demo:
                return run_demo(args)
            train(config_from(args))
            return 0
    except TrainingDiverged as exc:
        logging.getLogger("pretrain").error("%s", exc)
        return 3
    except (ValueError, FileNotFoundError, ManifestError, CheckpointError, RuntimeError) as exc:
        logging.getLogger("pretrain").debug("details", exc_info=True)
        logging.getLogger("pretrain").error("error: %s", exc)
        return 2


def _exit(code: int) -> None:
    """Leave with ``code``. A torchrun worker skips the interpreter's finalisation once everything
    it writes is written (checkpoints and summaries are atomic and closed before main() returns):
    gloo's C++ threads can still be tearing down then, and a finalising interpreter that meets them
    aborts the process (SIGABRT, "terminate called without an active exception") after a complete
    run, which torchrun reports as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
