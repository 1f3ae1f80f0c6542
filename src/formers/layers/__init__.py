"""Parts shared by two or more models."""
from .linear import Linear, linear  # first: the modules below use it
from .activations import SquaredReLU, StarReLU, apply_act
from .attention import Attention, sdpa
from .conv_norm import ConvBnReLU, SepConvBnReLU
from .drop import DropPath, drop_path_rates
from .helpers import cached_constant, check_image_input, feature_take_indices, to_2tuple
from .mixers import IdentityMixer, Pooling, RandomMixing, SepConv
from .mlp import ConvMlp, Mlp
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, spatial_shapes_list
from .norms import ChannelLayerNorm, CRMSNorm, LayerNorm2d, LayerNormNoBias, RMSNorm
from .patch_embed import PatchEmbed
from .pool import MAP_POOLS, TOKEN_POOLS, pool_map, pool_tokens
from .pos_embed import resample_pos_embed
from .scale import Scale, add_residual
from .transformer_block import TransformerBlock
from .windows import (relative_position_bias, relative_position_index, window_attention_mask,
                      window_partition, window_region_ids, window_reverse)
