"""The embedded demo: synthetic brain MRI studies on real anatomy, with planted findings and reports.

    from hlip_core.demo import build_demo, DEMO_TRAINING
    demo = build_demo("demo_output")       # NIfTI studies + reports, prepared into manifests
    train(TrainConfig(data=str(demo.train), eval_data=str(demo.test), eval_prompts=str(demo.prompts), **DEMO_TRAINING))
"""
from .build import DemoData, build_demo, prompts_path
from .synth import FINDINGS

# the tiny recipe the demo trains with (options of hlip_core.training.TrainConfig)
DEMO_TRAINING = {
    "config": "tiny_multiscan_h2",
    "max_scans": 4,
    "report_prefix": "This MRI study shows: ",
    "steps": 800,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 50,
    "weight_decay": 0.05,
    "vocab_size": 1000,
    "checkpoint_every": 200,
    "eval_every": 200,
    "workers": 1,
    "device": "cpu",
}

__all__ = ["DEMO_TRAINING", "DemoData", "FINDINGS", "build_demo", "prompts_path"]
