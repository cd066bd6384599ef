"""scratchoff engine: quantization-aware training with the Lottery Ticket Scratcher (LTS).

Distances are in quantization steps (Δ units); steps are 0-based optimizer steps of the QAT phase.
Names are imported on first use (PEP 562), so `import lts_core.store` does not pay for torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["ConfigError", "TrainConfig", "make_config"],
    "datasets": ["DATASETS", "DatasetError", "load_dataset"],
    "distance": ["decode_distance", "encode_distance"],
    "layers": ["QConv1d", "QConv2d", "QLinear", "measure_flops", "quantize_model", "quantized_layers"],
    "models": ["MODELS", "build_model"],
    "quantizers": ["LearnedIntervalQuantizer", "LSQQuantizer", "make_weight_quantizer"],
    "recorder": ["Recorder"],
    "rules": ["RULES", "FreezingRule", "LTSRule", "OscillationRule"],
    "schedules": ["SCHEDULES", "ratio_at"],
    "store": ["RunError", "list_runs", "open_run", "runs_dir"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lts_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
