"""rlformer: the Transformer family as swappable, verified sequence encoders.

    cfg = rlformer.EncoderConfig(d_model=128, n_layers=3, n_heads=4, attention="full",
                                 position="rope", memory="xl", block="gtrxl", mem_len=64)
    enc = rlformer.build_encoder(cfg)
    out = enc(x, state=None)        # out.output, out.state, out.aux_loss, out.info
"""
from rlformer import attention, blocks, depth, memory, position  # noqa: F401  (registers variants)
from rlformer.build import validate
from rlformer.config import (ACTConfig, AdaptiveSpanConfig, CompressiveConfig, EarlyExitConfig, EncoderConfig,
                             GlobalLocalConfig, KNNConfig, LinformerConfig, LocalConfig, LSHConfig,
                             RandomFeatureConfig, RoutingConfig, SparseConfig)
from rlformer.encoder import Encoder, EncoderOutput, build_encoder
from rlformer.encoder_decoder import EncoderDecoder, build_encoder_decoder  # noqa: F401
from rlformer.registry import available, register
from rlformer.state import EncoderState

__all__ = [
    "ACTConfig", "AdaptiveSpanConfig", "CompressiveConfig", "EarlyExitConfig", "Encoder", "EncoderConfig",
    "EncoderOutput", "EncoderState", "GlobalLocalConfig", "KNNConfig", "LSHConfig", "LinformerConfig",
    "LocalConfig", "RandomFeatureConfig", "RoutingConfig", "SparseConfig", "available", "build_encoder",
    "register", "validate",
]
