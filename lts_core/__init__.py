"""scratchoff engine: quantization-aware training with the Lottery Ticket Scratcher (LTS).

Distances are in quantization steps (Δ units); steps are 0-based optimizer steps of the QAT phase.
Names are imported on first use (PEP 562), so `import lts_core.store` does not pay for torch.
"""
from __future__ import annotations

from .lazy_exports import lazy_exports

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
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
