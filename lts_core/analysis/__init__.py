"""Analysis of recorded runs: settle statistics, freezing-rule replays and per-record distributions."""
from .settle import (RunArrays, SettleSummary, arrays_from_run, curve_from_settle_records, direction_reversals,
                     final_levels, flips, fraction_settled_curve, layer_fraction_settled_curves, level_occupancy,
                     never_moved, oscillation_frequency, settle_histogram, settle_records, settle_summary)
from .summaries import (build_cache, cached_level_stats, cached_oscillation_summary, cached_replay_index,
                        cached_settle_summary)
from .level_stats import LevelStats
from .replay import (OscReplay, ReplayIndex, ReplayResult, agreement, ema_trace, freeze_accounting,
                     osc_ema_update, osc_threshold_at, oscillation_summary, replay_accounting,
                     replay_freeze_steps, replay_oscillation, resolve_device, ticket_correct, ticket_precision)
from .distributions import (RecordDistributions, common_weight_edges, freeze_record_counts, rebin_codes,
                            record_distributions, weight_axis, weight_histogram)

__all__ = [
    "RunArrays", "SettleSummary", "arrays_from_run", "curve_from_settle_records", "direction_reversals",
    "final_levels", "flips", "fraction_settled_curve", "layer_fraction_settled_curves", "level_occupancy",
    "never_moved", "oscillation_frequency", "settle_histogram", "settle_records", "settle_summary",
    "OscReplay", "ReplayIndex", "ReplayResult", "agreement", "ema_trace", "freeze_accounting", "osc_ema_update",
    "osc_threshold_at", "oscillation_summary", "replay_accounting", "replay_freeze_steps", "replay_oscillation",
    "resolve_device",
    "ticket_correct", "ticket_precision",
    "build_cache", "cached_level_stats", "cached_oscillation_summary", "cached_replay_index",
    "cached_settle_summary", "LevelStats",
    "RecordDistributions", "common_weight_edges", "freeze_record_counts", "rebin_codes", "record_distributions",
    "weight_axis", "weight_histogram",
]
