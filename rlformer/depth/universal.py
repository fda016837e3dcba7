"""Universal Transformer (Dehghani et al. 2019) and Adaptive Computation Time (Graves 2016).

One block's weights are applied recurrently over depth. Before every step t = 1, 2, ... the
coordinate embedding of Dehghani et al. (sec. 2.1) is added,

    P^t_{i,2j}   = sin(i / 10000^{2j/d}) + sin(t / 10000^{2j/d})
    P^t_{i,2j+1} = cos(i / 10000^{2j/d}) + cos(t / 10000^{2j/d}),      H^t = Block(H^{t-1} + P^t),

with i the token's absolute position (tokens since its row's reset, so segments agree with one
pass). Each step has its own state slot, so memories (XL) stay per step.

``act`` adds ACT (Graves 2016, sec. 2, eqs. 5-14): after step n a sigmoid unit gives every
position a halting probability h^n = sigmoid(w^T s^n + b); the position halts at
N = min{n : sum_{n'<=n} h^{n'} >= threshold} (or at ``max_steps``), with remainder
R = 1 - sum_{n<N} h^n; its output is the halting-weighted mean y = sum_{n<N} h^n s^n + R s^N
(weights sum to 1), and the ponder cost tau * mean(N + R) goes to ``aux_loss``. A halted
position's state is copied forward unchanged, so attention in later steps still sees it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.depth.base import Depth
from rlformer.position.base import sinusoid
from rlformer.registry import lookup, register


def coordinate_embedding(pos: Tensor, step: int, d_model: int) -> Tensor:
    """P^t (Dehghani et al. 2019, sec. 2.1): sinusoid of the position plus sinusoid of the step; (B, T, D)."""
    step_enc = sinusoid(torch.tensor([float(step)], device=pos.device), d_model)
    return sinusoid(pos, d_model) + step_enc


def layers_are_stateless(cfg: EncoderConfig) -> bool:
    """True when skipping a layer for a segment leaves no stale state (no memory, no recurrent attention).

    Depth schemes may then skip layers whose output is discarded for every token; with a
    memory they must still run them so the memory sees the segment.
    """
    return not lookup("memory", cfg.memory).keeps_state and not lookup("attention", cfg.attention).stateful


def positions_of(run, h: Tensor) -> Tensor:
    """(B, T) absolute positions of the segment's tokens (from the encoder's layer runner)."""
    pos = getattr(run, "q_pos", None)
    if pos is None:
        return torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
    return pos


@register("depth", "universal")
class UniversalDepth(Depth):
    """Universal Transformer (Dehghani et al. 2019): one shared block applied n_layers times,
    H^t = Block(H^{t-1} + P^t) with the position + step coordinate embedding P^t (sec. 2.1).

    info["act_steps"]: (B, T) steps per position (n_layers everywhere).
    """

    def __init__(self, cfg, make_block):
        super().__init__(cfg, make_block)
        self.block = make_block(0)

    @property
    def max_steps(self) -> int:
        return self.cfg.n_layers

    @property
    def n_slots(self) -> int:
        return self.max_steps

    def step_input(self, h: Tensor, pos: Tensor, step: int) -> Tensor:
        return h + coordinate_embedding(pos, step, self.cfg.d_model).to(h.dtype)

    def forward(self, h, run, aux):
        pos = positions_of(run, h)
        for t in range(self.max_steps):
            h = run(t, self.block, self.step_input(h, pos, t + 1))
        aux.info["act_steps"] = torch.full(h.shape[:2], self.max_steps, dtype=torch.long, device=h.device)
        return h


@register("depth", "act")
class ACTDepth(UniversalDepth):
    """Universal Transformer with Adaptive Computation Time (Dehghani et al. 2019 sec. 2.2; Graves 2016).

    h^n = sigmoid(w^T s^n + b); N = min{n : sum_{n'<=n} h^{n'} >= threshold} capped at max_steps;
    R = 1 - sum_{n<N} h^n; y = sum_{n<N} h^n s^n + R s^N; aux_loss += tau * mean(N + R)
    (Graves eqs. 5-14). Halted positions are copied forward.
    info: "act_steps" (B, T) N; "act_remainder" (B, T) R; "act_weights" (steps run, B, T).
    """

    def __init__(self, cfg, make_block):
        super().__init__(cfg, make_block)
        acfg = cfg.act
        self.threshold, self.ponder_cost = acfg.threshold, acfg.ponder_cost
        self.halting = nn.Linear(cfg.d_model, 1)
        nn.init.constant_(self.halting.bias, acfg.halting_bias_init)
        self.skip_when_halted = layers_are_stateless(cfg)

    @property
    def max_steps(self) -> int:
        return self.cfg.act.max_steps

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        a = cfg.act
        if a.max_steps < 1:
            raise ValueError(f"act.max_steps must be >= 1 (the most recurrent steps a position may take), "
                             f"got {a.max_steps}")
        if not 0.0 < a.threshold <= 1.0:
            raise ValueError(f"act.threshold is 1 - epsilon of Graves 2016 and must be in (0, 1], e.g. 0.99; "
                             f"got {a.threshold}")
        if a.ponder_cost < 0:
            raise ValueError(f"act.ponder_cost (tau) must be >= 0, got {a.ponder_cost}")

    def forward(self, h, run, aux):
        pos = positions_of(run, h)
        b, t, _ = h.shape
        cum = h.new_zeros(b, t)                              # sum of h^n over the steps before halting
        halted = torch.zeros(b, t, dtype=torch.bool, device=h.device)
        steps = torch.zeros(b, t, dtype=torch.long, device=h.device)
        remainder = h.new_zeros(b, t)
        out = torch.zeros_like(h)
        weights = []
        for n in range(1, self.max_steps + 1):
            new = run(n - 1, self.block, self.step_input(h, pos, n))
            h = torch.where(halted[..., None], h, new)       # halted positions are copied forward
            p = torch.sigmoid(self.halting(h)).squeeze(-1)
            running = ~halted
            halt_now = running & ((cum + p >= self.threshold) | (n == self.max_steps))
            w = torch.where(halt_now, 1 - cum, torch.where(running, p, torch.zeros_like(p)))
            out = out + w[..., None] * h
            weights.append(w)
            remainder = torch.where(halt_now, 1 - cum, remainder)
            steps = torch.where(halt_now, torch.full_like(steps, n), steps)
            cum = torch.where(running & ~halt_now, cum + p, cum)
            halted = halted | halt_now
            if self.skip_when_halted and bool(halted.all()):
                break
        aux.add(self.ponder_cost * (steps.to(remainder.dtype) + remainder).mean())
        aux.info["act_steps"] = steps
        aux.info["act_remainder"] = remainder.detach()
        aux.info["act_weights"] = torch.stack(weights).detach()
        return out

    def reference(self, h: Tensor, run, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Graves' equations with explicit per-position loops (slow; for tests).

        Runs all ``max_steps`` steps with halted states copied forward, then, per position,
        finds N and R from the halting probabilities and forms the weighted mean.
        Returns (output, N, R).
        """
        pos = positions_of(run, h) if pos is None else pos
        b, t, _ = h.shape
        states, probs = [], []
        halted = torch.zeros(b, t, dtype=torch.bool, device=h.device)
        cum = torch.zeros(b, t, dtype=h.dtype, device=h.device)
        for n in range(1, self.max_steps + 1):
            new = run(n - 1, self.block, self.step_input(h, pos, n))
            h = torch.where(halted[..., None], h, new)
            p = torch.sigmoid(self.halting(h)).squeeze(-1)
            states.append(h)
            probs.append(p)
            halted = halted | (cum + p >= self.threshold)
            cum = cum + p
        out = torch.zeros_like(h)
        n_steps = torch.zeros(b, t, dtype=torch.long)
        rem = torch.zeros(b, t, dtype=h.dtype)
        for i in range(b):
            for j in range(t):
                total, big_n = 0.0, self.max_steps
                for n in range(1, self.max_steps + 1):
                    if float((total + probs[n - 1][i, j]).detach()) >= self.threshold:
                        big_n = n
                        break
                    total = total + probs[n - 1][i, j]
                r = 1 - sum(probs[n - 1][i, j] for n in range(1, big_n))
                y = sum(probs[n - 1][i, j] * states[n - 1][i, j] for n in range(1, big_n)) + r * states[big_n - 1][i, j]
                out[i, j], n_steps[i, j], rem[i, j] = y, big_n, r
        return out, n_steps, rem
