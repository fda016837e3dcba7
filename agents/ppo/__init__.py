"""Online PPO with a transformer memory (GTrXL by default): ``scripts/train_gtrxl.py``.

    from agents.ppo import PPOConfig, PPOTrainer, preset_for, train
    summary = train(preset_for("rlformer/TMaze-v0"))
"""
from agents.ppo.config import PRESETS, EnvOptions, PPOConfig, RunConfig, gtrxl_backbone, preset_for, tmaze_long
from agents.ppo.policy import PPOPolicy
from agents.ppo.train import PPOTrainer, default_run_name, replay_error, train

__all__ = ["EnvOptions", "PPOConfig", "PPOPolicy", "PPOTrainer", "PRESETS", "RunConfig", "default_run_name", "gtrxl_backbone",
           "preset_for", "replay_error", "tmaze_long", "train"]
