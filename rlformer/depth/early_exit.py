"""Per-token early exit: Depth-Adaptive Transformer (Elbayad et al. 2020) / CALM (Schuster et al. 2022).

Every layer n has an exit: a head (LayerNorm + linear to ``n_classes``, shared by the layers or
one per layer) and a confidence c^n_t per token. At inference (eval mode) a token exits after
the first layer n < L with c^n_t >= threshold; its state h^n_t is then copied to every later
layer (CALM sec. 3.2, "state propagation"), so the layers above still attend to it, and the
encoder outputs h^{exit}_t. Confidence measures (CALM sec. 3.1):

- ``softmax_gap``: p_(1) - p_(2), the gap between the two largest exit-head probabilities
  (discrete outputs; needs ``n_classes`` >= 2);
- ``saturation``: cos(h^n_t, h^{n-1}_t), how little the layer changed the state (any output;
  h^0 is the depth input);
- ``classifier``: a learned exit classifier sigmoid(w^T LN(h^n_t) + b) (any output), trained
  inside ``aux_loss`` on detached states with CALM's consistency target: 1[argmax of exit n ==
  argmax of the last exit] with heads, else the soft target clamp(cos(h^n_t, h^L_t), 0, 1).

Training (Elbayad et al. 2020, sec. 3.1, "aligned" training): all layers run, and
``exit_losses(info, targets)`` returns sum_n w_n CE(exit n, targets) with w_n = 1/L
("uniform") or n / sum(n) ("linear"); ``exit_losses(info, loss_fn=...)`` applies any per-layer
loss to the layer states ``info["exit_hidden"]`` instead (continuous outputs). With
``threshold = inf`` (the default) no token ever exits and the output equals the plain stack
(``depth='fixed'`` with the same weights) exactly. ``calibrate_threshold`` picks the threshold
on held-out data (the grid search of Elbayad et al. 2020, sec. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.depth.base import Depth
from rlformer.depth.universal import layers_are_stateless
from rlformer.registry import register

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
"""thresholds tried by ``calibrate_threshold`` (every confidence measure lies in [-1, 1])"""


def _normed_linear(d_model: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, out))


def softmax_gap(logits: Tensor) -> Tensor:
    """p_(1) - p_(2) of softmax(logits) over the last dim."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).to(logits.dtype)


@register("depth", "early_exit")
class EarlyExitDepth(Depth):
    """Per-token early exit with state propagation (Elbayad et al. 2020; Schuster et al. 2022, CALM).

    Token t exits after layer n = min{n < L : c^n_t >= threshold} (eval mode only); its state
    is copied to layers n+1..L. c = softmax gap p_(1) - p_(2) of the exit head, hidden-state
    saturation cos(h^n, h^{n-1}), or a learned classifier sigmoid(w^T LN(h^n) + b).
    Training loss over exits: sum_n w_n L_n (``exit_losses``).
    info: "exit_layer" (B, T) layers used (1..L); "exit_confidence" (L, B, T);
    "exit_hidden" list of L states (B, T, D); "exit_logits" (L, B, T, n_classes) with heads.
    """

    def __init__(self, cfg, make_block):
        super().__init__(cfg, make_block)
        ecfg = cfg.early_exit
        self.blocks = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))   # same names as depth='fixed'
        self.confidence, self.threshold = ecfg.confidence, float(ecfg.threshold)
        n_exits = 1 if ecfg.shared_head else cfg.n_layers
        self.heads = nn.ModuleList(_normed_linear(cfg.d_model, ecfg.n_classes) for _ in range(n_exits)) \
            if ecfg.n_classes > 0 else None
        n_cls = 1 if ecfg.shared_head else cfg.n_layers - 1                         # the last layer never decides
        self.classifiers = nn.ModuleList(_normed_linear(cfg.d_model, 1) for _ in range(n_cls)) \
            if ecfg.confidence == "classifier" and cfg.n_layers > 1 else None
        self.skip_when_exited = layers_are_stateless(cfg)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        e = cfg.early_exit
        if e.n_classes < 0:
            raise ValueError(f"early_exit.n_classes must be >= 0 (0 = no exit heads), got {e.n_classes}")
        if e.confidence == "softmax_gap" and e.n_classes < 2:
            raise ValueError(f"early_exit.confidence='softmax_gap' needs exit heads over a discrete output: set "
                             f"early_exit.n_classes >= 2 (got {e.n_classes}), or use confidence='saturation' or "
                             f"'classifier', which work for any output")
        if e.confidence not in ("softmax_gap", "saturation", "classifier"):
            raise ValueError(f"unknown early_exit.confidence {e.confidence!r}; use 'softmax_gap', 'saturation' or "
                             f"'classifier'")
        if math.isnan(e.threshold):
            raise ValueError("early_exit.threshold is NaN; use a number, or inf to never exit early")
        if e.classifier_weight < 0:
            raise ValueError(f"early_exit.classifier_weight must be >= 0, got {e.classifier_weight}")

    @property
    def n_slots(self) -> int:
        return len(self.blocks)

    def head(self, n: int) -> nn.Module:
        return self.heads[0 if len(self.heads) == 1 else n]

    def classifier(self, n: int) -> nn.Module:
        return self.classifiers[0 if len(self.classifiers) == 1 else n]

    def score(self, n: int, h: Tensor, prev: Tensor, logits: Optional[Tensor]) -> Tensor:
        """c^n (B, T): the confidence that layer n's state is final."""
        if self.confidence == "softmax_gap":
            return softmax_gap(logits)
        if self.confidence == "saturation":
            return F.cosine_similarity(h, prev, dim=-1)
        if self.classifiers is None:                           # one layer: nothing to decide
            return torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        return torch.sigmoid(self.classifier(min(n, len(self.classifiers) - 1))(h)).squeeze(-1)

    def forward(self, h, run, aux):
        n_layers = len(self.blocks)
        decide = not self.training and self.threshold < math.inf
        exited = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        exit_layer = torch.full(h.shape[:2], n_layers, dtype=torch.long, device=h.device)
        hidden, logits, conf = [], [], []
        prev = h
        for n, block in enumerate(self.blocks):
            if decide and self.skip_when_exited and bool(exited.all()):
                hidden.append(h)                               # every state is frozen: nothing left to run
                logits.extend(logits[-1:])
                conf.append(conf[-1])
                continue
            new = run(n, block, h)
            h = torch.where(exited[..., None], h, new) if decide else new
            lg = self.head(n)(h) if self.heads is not None else None
            c = self.score(n, h, prev, lg)
            hidden.append(h)
            logits.append(lg)
            conf.append(c.detach())
            prev = h
            if decide and n < n_layers - 1:
                now = ~exited & (c >= self.threshold)
                exit_layer = torch.where(now, torch.full_like(exit_layer, n + 1), exit_layer)
                exited = exited | now
        if self.training and self.classifiers is not None:
            aux.add(self.cfg.early_exit.classifier_weight * self.classifier_loss(hidden, logits))
        aux.info["exit_layer"] = exit_layer
        aux.info["exit_confidence"] = torch.stack(conf)
        aux.info["exit_hidden"] = hidden
        if self.heads is not None:
            aux.info["exit_logits"] = torch.stack(logits)
        return h

    def classifier_loss(self, hidden: list, logits: list) -> Tensor:
        """BCE of the exit classifier at layers 1..L-1 on detached states (CALM's consistency target)."""
        last = hidden[-1].detach()
        losses = []
        for n in range(len(hidden) - 1):
            h = hidden[n].detach()
            if self.heads is not None:
                target = (logits[n].detach().argmax(-1) == logits[-1].detach().argmax(-1)).to(h.dtype)
            else:
                target = F.cosine_similarity(h, last, dim=-1).clamp(0.0, 1.0)
            pred = self.classifier(n)(h).squeeze(-1)
            losses.append(F.binary_cross_entropy_with_logits(pred, target))
        return torch.stack(losses).mean()

    def exit_weights(self, n_layers: int) -> list[float]:
        """w_n of the combined exit loss: 1/L, or n / sum(n) (Elbayad et al. 2020, sec. 3.1)."""
        if self.cfg.early_exit.loss_weights == "uniform":
            return [1.0 / n_layers] * n_layers
        total = n_layers * (n_layers + 1) / 2
        return [(n + 1) / total for n in range(n_layers)]

    def exit_losses(self, info: dict, targets: Optional[Tensor] = None,
                    loss_fn: Optional[Callable[[Tensor], Tensor]] = None, ignore_index: int = -100) -> Tensor:
        """Training loss over all exits: sum_n w_n L_n. Add it to your loss in training.

        With exit heads (n_classes > 0): L_n = cross-entropy of ``info["exit_logits"][n]``
        against ``targets`` (B, T) long (``ignore_index`` skipped). Otherwise pass ``loss_fn``
        mapping a layer state (B, T, D) to a scalar loss, e.g. ``lambda h: mse(head(enc.norm(h)), y)``
        (apply the encoder's final norm ``enc.norm`` as the full model's output does).
        """
        if loss_fn is not None:
            losses = [loss_fn(h) for h in info["exit_hidden"]]
        else:
            if self.heads is None or targets is None:
                raise ValueError("exit_losses needs targets with exit heads (early_exit.n_classes > 0), or a "
                                 "loss_fn(hidden) -> loss for each layer's state")
            logits = info["exit_logits"]
            losses = [F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1),
                                      ignore_index=ignore_index) for lg in logits]
        return sum(w * loss for w, loss in zip(self.exit_weights(len(losses)), losses))

    @staticmethod
    def logits_at_exit(info: dict) -> Tensor:
        """(B, T, n_classes): each token's exit-head logits at the layer it exited."""
        logits, layer = info["exit_logits"], info["exit_layer"]
        idx = (layer - 1)[None, ..., None].expand(1, *layer.shape, logits.shape[-1])
        return logits.gather(0, idx)[0]


@dataclass
class CalibrationResult:
    threshold: float
    """the chosen threshold (inf when no finite one meets the tolerance)"""
    avg_layers: float
    """mean layers used per (unpadded) token at that threshold"""
    metric: float
    full_metric: float
    """the metric with threshold = inf (the full model)"""
    table: list = field(default_factory=list)
    """(threshold, metric, avg_layers) for every threshold tried"""


def calibrate_threshold(encoder: nn.Module, evaluate: Callable[[], float], tolerance: float,
                        grid: Sequence[float] = DEFAULT_GRID, higher_is_better: bool = True) -> CalibrationResult:
    """Grid-search the exit threshold on held-out data (Elbayad et al. 2020, sec. 4).

    ``evaluate()`` runs your model (which calls ``encoder``) over the held-out data and returns
    one number: an accuracy (``higher_is_better=True``) or a loss (False). It is called once
    with threshold = inf and once per grid value, in eval mode and without gradients; the
    layers used are read from every encoder call. Returns the threshold that uses the fewest
    layers on average while the metric stays within ``tolerance`` of the full model's
    (drop in accuracy <= tolerance, or increase in loss <= tolerance). The encoder's
    threshold and training mode are restored afterwards; set ``encoder.depth.threshold``
    yourself to use the result.
    """
    depth = getattr(encoder, "depth", None)
    if not isinstance(depth, EarlyExitDepth):
        raise ValueError("calibrate_threshold needs an encoder built with depth='early_exit'")
    if not tolerance >= 0:
        raise ValueError(f"tolerance is the largest allowed loss of quality vs the full model and must be >= 0, "
                         f"got {tolerance}")
    counts = {"layers": 0.0, "tokens": 0.0}

    def hook(module, args, output):
        _, run, aux = args
        layer = aux.info["exit_layer"].double()
        valid = getattr(run, "valid", None)
        weight = torch.ones_like(layer) if valid is None else valid.double()
        counts["layers"] += float((layer * weight).sum())
        counts["tokens"] += float(weight.sum())

    def measure(threshold: float) -> tuple[float, float]:
        depth.threshold = threshold
        counts.update(layers=0.0, tokens=0.0)
        metric = float(evaluate())
        return metric, counts["layers"] / max(counts["tokens"], 1.0)

    old_threshold, was_training = depth.threshold, encoder.training
    handle = depth.register_forward_hook(hook)
    encoder.eval()
    try:
        with torch.no_grad():
            full_metric, full_layers = measure(math.inf)
            table = [(math.inf, full_metric, full_layers)]
            table += [(float(t), *measure(float(t))) for t in sorted(grid)]
    finally:
        handle.remove()
        depth.threshold = old_threshold
        encoder.train(was_training)
    sign = 1.0 if higher_is_better else -1.0
    ok = [table[0]] + [row for row in table[1:] if sign * (full_metric - row[1]) <= tolerance]
    best = min(ok, key=lambda row: (row[2], -row[0]))
    return CalibrationResult(threshold=best[0], avg_layers=best[2], metric=best[1], full_metric=full_metric,
                             table=table)
