"""Tools that show what the model does: class-attention maps, explanations of a prediction
and their faithfulness, residual-branch contributions and the paper's ablations, each one
library call (and one CLI command). The modules ``explain`` and ``faithfulness`` keep
their functions of the same names (not exported here, where they would hide them)."""

from cait.analysis.ablation import GRIDS, get_grid, run_ablation
from cait.analysis.attention import AttentionMaps, attention_maps, save_attention_maps
from cait.analysis.explain import METHODS, Explanation, save_explanations
from cait.analysis.faithfulness import Faithfulness, save_faithfulness
from cait.analysis.residuals import ResidualRatios, residual_ratios, save_residual_report

__all__ = [
    "GRIDS",
    "METHODS",
    "AttentionMaps",
    "Explanation",
    "Faithfulness",
    "ResidualRatios",
    "attention_maps",
    "get_grid",
    "residual_ratios",
    "run_ablation",
    "save_attention_maps",
    "save_explanations",
    "save_faithfulness",
    "save_residual_report",
]
