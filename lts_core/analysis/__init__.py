"""Analysis of recorded runs: settle statistics, freezing-rule replays and per-record distributions.

Names are imported on first use (PEP 562, as in `lts_core`): the replays need torch, the settle statistics,
cached summaries and distributions do not, so a page that reads only those does not pay for importing it.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "settle": ["RunArrays", "SettleSummary", "arrays_from_run", "curve_from_settle_records", "direction_reversals",
              "final_levels", "flips", "fraction_settled_curve", "layer_fraction_settled_curves", "level_occupancy",
              "never_moved", "oscillation_frequency", "settle_histogram", "settle_records", "settle_summary"],
    "summaries": ["build_cache", "cached_level_stats", "cached_oscillation_summary", "cached_record_distributions",
              "cached_replay_index", "cached_settle_summary", "first_view_distributions"],
    "level_stats": ["LevelStats"],
    "replay": ["OscReplay", "ReplayIndex", "ReplayResult", "agreement", "ema_trace", "freeze_accounting",
              "osc_ema_update", "osc_threshold_at", "oscillation_summary", "replay_accounting",
              "replay_freeze_steps", "replay_oscillation", "resolve_device", "ticket_correct", "ticket_precision"],
    "distributions": ["RecordDistributions", "common_weight_edges", "freeze_record_counts", "rebin_codes",
              "record_distributions", "weight_axis", "weight_histogram"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
