"""LatentQA: read a chat model's activations in plain language, and steer it.

    from latentqa import LatentQA, load_config, read, score, steer, evaluate

    lqa = LatentQA.load(load_config("infra/configs/smollm2-135m-instruct.yaml"))  # or decoder=...
    read(lqa, [[{"role": "user", "content": "Hi"}]], [["What is the assistant like?"]])

The names load on first use, so `import latentqa.config` (the command line's help, the Ray
driver) does not pull in torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "LatentQA": "session",
    "load_config": "config",
    "LatentQAConfig": "config",
    "read": "reading",
    "score": "reading",
    "steer": "steering",
    "load_control": "steering",
    "SteeringEvaluation": "steering_evaluation",
    "evaluate": "evaluation",
    "run_suite": "suite",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'latentqa' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
