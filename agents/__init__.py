"""RL agents built on rlformer: Decision Transformer (``agents.dt``), baselines, shared utilities.

``agents.common`` holds what every agent needs (run directory, TensorBoard, progress bar,
checkpoints, seeding, device, ``summary.json``); agents own the loop, never the math.
"""
