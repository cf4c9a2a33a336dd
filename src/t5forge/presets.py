"""Named presets (`task=NAME`): partial configs layered on the defaults of `t5forge.config.RunConfig`.

The defaults already are nanoT5's `default.yaml` + `task/pt.yaml` (T5-v1.1-base from scratch on
C4, AdamWScale 2e-2, batch 128, 65,536 steps, cosine with 10k warmup). `pt_4h` ... `pt_24h` are
nanoT5's `task/pt_*h.yaml` step/batch settings (named after their time on one A100 in the nanoT5
paper; they set no time budget here either), `ft` is nanoT5's Tk-Instruct fine-tuning on
Super-NaturalInstructions. `pt_cpu`, `pt_tiny` and `ft_tiny` are small enough for a laptop CPU.

Presets are plain data: every key is checked against the schema exactly like a user's YAML file.
The log interval (and pt_cpu's eval interval) is null: the plan scales it with the run's length, so a
fine-tune whose step count comes from its data logs about 100 points whatever its size (see t5forge.plan).
"""

import copy

from t5forge.errors import T5ForgeError


def _nanot5_hours(warmup_steps: int, total_steps: int) -> dict:
    # nanoT5's pt_*h tasks: batch 256 in 2 micro-steps, schedule length scaled with the hours.
    return {"optim": {"warmup_steps": warmup_steps, "batch_size": 256, "total_steps": total_steps, "grad_acc": 2}}


PRESETS: dict[str, dict] = {
    "pt": {},
    "pt_4h": _nanot5_hours(1666, 13333),
    "pt_8h": _nanot5_hours(3332, 26666),
    "pt_12h": _nanot5_hours(5000, 39999),
    "pt_16h": _nanot5_hours(6666, 53332),
    "pt_20h": _nanot5_hours(8332, 66665),
    "pt_24h": _nanot5_hours(10000, 79998),
    # nanoT5 task/ft.yaml: Tk-Instruct on SNI ("def + 2 pos" prompts, 100 instances per task),
    # starting from pretrained weights (nanoT5 users pass model.random_init=false or a checkpoint).
    "ft": {
        "mode": "ft",
        "precision": "fp32",  # nanoT5: precision 'no'
        "model": {"random_init": False},
        "optim": {
            "name": "adamw",
            "base_lr": 5e-5,
            "batch_size": 8,
            "total_steps": -1,
            "epochs": 2,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
            "weight_decay": 0.0,
            "grad_clip": 0.0,
            "grad_acc": 1,
        },
        "eval": {"steps": 200},
    },
    # A 10.6M-parameter T5 (8.2M of them the embedding and the LM head, with T5's 32,128-row vocabulary;
    # 4.5M with an 8,192-id tokenizer) that pre-trains on a laptop CPU in minutes.
    "pt_cpu": {
        "precision": "fp32",
        "device": "cpu",
        "model": {"name": "tiny", "d_model": 128, "d_kv": 32, "num_heads": 4, "d_ff": 512, "num_layers": 4},
        "data": {"input_length": 128, "num_workers": 0},
        "optim": {"batch_size": 16, "total_steps": 400, "warmup_steps": 40},
        # Log and eval intervals left to the plan (logging.every_steps is null by default): ~100 log
        # points and 10 evaluations, so optim.total_steps=4000 gives curves of the same density.
        "eval": {"every_steps": None, "steps": 10},
        "checkpoint": {"every_steps": 200, "keep_last": 2},
    },
    # Smoke tests: the built-in `tiny` model, a few steps, every hook fires.
    "pt_tiny": {
        "precision": "fp32",
        "device": "cpu",
        "model": {"name": "tiny"},
        "data": {"input_length": 64, "num_workers": 0},
        "optim": {"batch_size": 4, "total_steps": 20, "warmup_steps": 2},
        "eval": {"every_steps": 10, "steps": 2},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "logging": {"every_steps": 1},
    },
    "ft_tiny": {
        "mode": "ft",
        "precision": "fp32",
        "device": "cpu",
        "model": {"name": "tiny", "random_init": True},
        "data": {"num_workers": 0},
        "optim": {
            "name": "adamw", "base_lr": 1e-3, "batch_size": 4, "total_steps": 20, "epochs": -1,
            "warmup_steps": 0, "lr_scheduler": "constant", "grad_clip": 0.0,
        },
        "eval": {"every_steps": 10, "steps": 2},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "logging": {"every_steps": 1},
        "finetune": {"max_seq_len": 256, "max_target_len": 32, "max_num_instances_per_task": 20},
    },
}

DESCRIPTIONS = {
    "pt": "nanoT5 default: T5-v1.1-base from scratch on C4, AdamWScale 2e-2, batch 128, 65,536 steps",
    "pt_4h": "nanoT5 pt_4h: batch 256 (grad_acc 2), 13,333 steps, warmup 1,666",
    "pt_8h": "nanoT5 pt_8h: batch 256 (grad_acc 2), 26,666 steps, warmup 3,332",
    "pt_12h": "nanoT5 pt_12h: batch 256 (grad_acc 2), 39,999 steps, warmup 5,000",
    "pt_16h": "nanoT5 pt_16h: batch 256 (grad_acc 2), 53,332 steps, warmup 6,666",
    "pt_20h": "nanoT5 pt_20h: batch 256 (grad_acc 2), 66,665 steps, warmup 8,332",
    "pt_24h": "nanoT5 pt_24h: batch 256 (grad_acc 2), 79,998 steps, warmup 10,000",
    "ft": "nanoT5 ft: Tk-Instruct on SNI, AdamW 5e-5 constant, batch 8, 2 epochs, no clipping, fp32",
    "pt_cpu": "laptop CPU: 10.6M-parameter T5 (with T5's vocabulary), input 128, batch 16, 400 steps, fp32, 10 evaluations",
    "pt_tiny": "smoke test: tiny T5, input 64, batch 4, 20 steps, every hook fires",
    "ft_tiny": "smoke test for fine-tuning: tiny T5, batch 4, 20 steps",
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of the named preset's partial config."""
    if name not in PRESETS:
        raise T5ForgeError(f"unknown task={name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
