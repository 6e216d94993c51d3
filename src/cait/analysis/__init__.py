"""Tools that show what the model does: class-attention maps, residual-branch
contributions and the paper's ablations, each one library call (and one CLI command)."""

from cait.analysis.ablation import GRIDS, get_grid, run_ablation
from cait.analysis.attention import AttentionMaps, attention_maps, save_attention_maps
from cait.analysis.residuals import ResidualRatios, residual_ratios, save_residual_report

__all__ = [
    "GRIDS",
    "AttentionMaps",
    "ResidualRatios",
    "attention_maps",
    "get_grid",
    "residual_ratios",
    "run_ablation",
    "save_attention_maps",
    "save_residual_report",
]
