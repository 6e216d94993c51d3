"""Tools that show what the model does: class-attention maps, residual-branch
contributions and the paper's ablations, each one library call (and one CLI command)."""

from cait.analysis.attention import AttentionMaps, attention_maps, save_attention_maps

__all__ = ["AttentionMaps", "attention_maps", "save_attention_maps"]
