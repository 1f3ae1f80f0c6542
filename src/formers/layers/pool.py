"""Global pooling of a backbone's final features, with timm's `global_pool` names.

Map backbones take 'avg', 'max', 'avgmax' (the mean of the two) and '' (no pooling: the map
itself); token backbones take 'token' (the first, cls, token), 'avg' (the mean of the patch
tokens) and ''. A model lists the ones it takes in `pool_types`.
"""
import torch

__all__ = ["MAP_POOLS", "TOKEN_POOLS", "pool_map", "pool_tokens"]

MAP_POOLS = ("avg", "max", "avgmax", "")
TOKEN_POOLS = ("token", "avg", "")


def pool_map(x: torch.Tensor, pool_type: str, channels_last: bool = False) -> torch.Tensor:
    """(B, C, H, W) (or (B, H, W, C) with `channels_last`) -> (B, C); '' returns x unchanged."""
    dims = (1, 2) if channels_last else (2, 3)
    if pool_type == "avg":
        return x.mean(dims)
    if pool_type == "max":
        return x.amax(dims)
    if pool_type == "avgmax":
        return 0.5 * (x.mean(dims) + x.amax(dims))
    return x


def pool_tokens(x: torch.Tensor, pool_type: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B, N, C) -> (B, C): the first token ('token') or the mean of the tokens after the prefix
    ('avg'); '' returns x unchanged."""
    if pool_type == "token":
        return x[:, 0]
    if pool_type == "avg":
        return x[:, num_prefix_tokens:].mean(1)
    return x
