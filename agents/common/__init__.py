"""Shared agent utilities: small, tested, no agent-specific logic.

    from agents.common import (RunLogger, make_run_dir, progress, gpu_memory_mb,
                               save_checkpoint, load_checkpoint, latest_checkpoint,
                               write_summary, seed_everything, resolve_device)
"""
from agents.common.checkpoint import (
                                      get_rng_state,
                                      latest_checkpoint,
                                      load_checkpoint,
                                      save_checkpoint,
                                      set_rng_state,
                                      unwrap_model,
)
from agents.common.device import resolve_device
from agents.common.logging import RunLogger, gpu_memory_mb, make_run_dir, progress
from agents.common.seeding import seed_everything
from agents.common.summary import to_jsonable, write_json, write_summary

__all__ = [
    "RunLogger", "get_rng_state", "gpu_memory_mb", "latest_checkpoint", "load_checkpoint", "make_run_dir",
    "progress", "resolve_device", "save_checkpoint", "seed_everything", "set_rng_state", "to_jsonable",
    "unwrap_model", "write_json", "write_summary",
]
