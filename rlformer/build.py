"""Build-time validation: every impossible combination is refused here, with a fix."""
from __future__ import annotations

from rlformer.config import EncoderConfig
from rlformer.registry import KINDS, available, lookup


def variant_classes(cfg: EncoderConfig) -> dict[str, type]:
    return {kind: lookup(kind, getattr(cfg, kind)) for kind in KINDS}


def validate(cfg: EncoderConfig) -> dict[str, type]:
    """Check ``cfg``; return the class of each chosen variant. Raises ValueError with a fix."""
    if cfg.d_model < 1 or cfg.n_heads < 1 or cfg.n_layers < 1:
        raise ValueError(f"d_model, n_heads and n_layers must be >= 1; got {cfg.d_model}, {cfg.n_heads}, "
                         f"{cfg.n_layers}")
    if cfg.d_model % cfg.n_heads:
        divisors = [h for h in range(1, min(cfg.d_model, 64) + 1) if cfg.d_model % h == 0]
        raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; "
                         f"choose n_heads in {divisors}")
    if cfg.d_ff is not None and cfg.d_ff < 1:
        raise ValueError(f"d_ff (feed-forward width) must be >= 1, or None for 4 * d_model; got {cfg.d_ff}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    cls = variant_classes(cfg)
    att, pos, mem = cls["attention"], cls["position"], cls["memory"]
    if cfg.causal and not att.supports_causal:
        raise ValueError(f"attention={cfg.attention!r} cannot be causal: {att.__doc__.strip().splitlines()[0]} "
                         f"{getattr(att, 'causal_note', '')} Set causal=False for bidirectional use, or pick a "
                         f"causal attention: {_names('attention', lambda c: c.supports_causal)}.")
    if not cfg.causal and not att.supports_bidirectional:
        raise ValueError(f"attention={cfg.attention!r} only supports causal=True; set causal=True or pick one of "
                         f"{_names('attention', lambda c: c.supports_bidirectional)}.")
    missing = set(pos.hooks) - {"input"} - set(att.position_hooks)
    if missing:
        ok = _names("position", lambda p: not (set(p.hooks) - {"input"} - set(att.position_hooks)))
        raise ValueError(f"position={cfg.position!r} works through the attention's {sorted(missing)} hook, which "
                         f"attention={cfg.attention!r} does not apply (it never forms that part of the score "
                         f"computation). With attention={cfg.attention!r} use position in {ok}, or use "
                         f"attention='full' with position={cfg.position!r}.")
    if mem.keeps_state and not att.supports_memory:
        raise ValueError(f"memory={cfg.memory!r} prepends cached states to the keys, which "
                         f"attention={cfg.attention!r} cannot attend to; use memory='none' with it, or an "
                         f"attention in {_names('attention', lambda c: c.supports_memory)}.")
    for c in cls.values():
        c.validate(cfg)
    return cls


def _names(kind: str, keep) -> list[str]:
    return [n for n in available()[kind] if keep(lookup(kind, n))]
