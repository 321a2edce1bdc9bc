"""Figures and the written report (matplotlib, Agg backend; inputs are plain numpy and dicts)."""

from prefjax.report.figures import (dose_response, inlp_trajectory, probe_r_by_layer,
                                    transfer_heatmap, utilities_by_topic)
from prefjax.report.summary import format_value, wilson_interval, write_report

__all__ = [
    "utilities_by_topic", "probe_r_by_layer", "transfer_heatmap", "dose_response",
    "inlp_trajectory", "write_report", "wilson_interval", "format_value",
]
