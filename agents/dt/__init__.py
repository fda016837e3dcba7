"""Decision Transformer (Chen et al. 2021) on Minari datasets, with any causal rlformer backbone.

    python scripts/train_dt.py --env hopper-medium                  # quick preset
    python scripts/train_dt.py --env hopper-medium --preset paper   # 100k updates, 100 eval episodes
"""
from agents.dt.config import DTConfig, default_backbone
from agents.dt.model import DecisionTransformer

__all__ = ["DTConfig", "DecisionTransformer", "default_backbone"]
