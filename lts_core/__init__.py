"""scratchoff engine: quantization-aware training with the Lottery Ticket Scratcher (LTS).

Distances are in quantization steps (Δ units); steps are 0-based optimizer steps of the QAT phase.
"""
from .config import ConfigError, TrainConfig, make_config
from .datasets import DATASETS, DatasetError, load_dataset
from .distance import decode_distance, encode_distance
from .layers import QConv1d, QConv2d, QLinear, measure_flops, quantize_model, quantized_layers
from .quantizers import LearnedIntervalQuantizer, LSQQuantizer, make_weight_quantizer
from .rules import RULES, FreezingRule, LTSRule, OscillationRule
from .recorder import Recorder
from .schedules import SCHEDULES, ratio_at
from .models import MODELS, build_model
from .store import RunError, list_runs, open_run, runs_dir

__version__ = "0.1.0"

__all__ = [
    "decode_distance", "encode_distance", "QConv1d", "QConv2d", "QLinear", "measure_flops", "quantize_model",
    "quantized_layers", "LearnedIntervalQuantizer", "LSQQuantizer", "make_weight_quantizer", "RULES",
    "FreezingRule", "LTSRule", "OscillationRule", "SCHEDULES", "ratio_at", "Recorder", "RunError", "list_runs",
    "open_run", "runs_dir", "ConfigError", "TrainConfig", "make_config", "DATASETS", "DatasetError", "load_dataset",
    "MODELS", "build_model",
]
