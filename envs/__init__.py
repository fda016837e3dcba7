"""Tasks, wrappers and offline datasets used by rlformer's agents (no heavy imports here)."""
from envs.datasets import (  # noqa: F401  (light: numpy only; minari is imported lazily)
    DatasetError,
    DatasetNotFoundError,
    UnknownDatasetError,
    load_dataset,
    resolve_dataset,
)
from envs import registration as _registration  # noqa: F401  (registers the rlformer/* gymnasium ids)
