"""Small helpers every model uses: tuples, index selection, input checks."""
import functools

import torch
import torch.fx

__all__ = ["to_2tuple", "feature_take_indices", "check_image_input", "image_checks", "cached_constant",
           "is_traced"]


def is_traced(x: torch.Tensor) -> bool:
    """True under TorchScript, torch.fx symbolic tracing (x is a Proxy) and torch.compile / torch.export:
    where the eager-only fast paths (in-place updates, custom autograd Functions, oneDNN routing, shape
    tests in Python) must step aside for plain tensor ops."""
    if torch.jit.is_scripting():
        return True
    else:
        return isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()


def to_2tuple(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def feature_take_indices(num_stages: int, indices=None) -> tuple[list[int], int]:
    """timm's meaning: None = all, an int n = the last n, a list = those (negative from the end).

    Returns the absolute indices and the largest one (so a caller can stop early).
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: expected 1..{num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = []
        for i in indices:
            j = i + num_stages if i < 0 else i
            if not 0 <= j < num_stages:
                raise ValueError(f"feature index {i} is out of range for {num_stages} stages")
            take.append(j)
    return take, max(take)


def check_image_input(model, x, divisor: int = 1, min_size: int = 1, fixed_size=None):
    """Raise a ValueError naming the model and what it needs for a batch it cannot take.

    Returns (H, W). `divisor`: H and W must be multiples of it; `fixed_size`: (H, W) the
    model was built for and cannot change (e.g. a frozen token-mixing matrix). A floating input
    of another dtype than the model's weights (outside autocast), or on another device, is refused
    with the cast or move that fixes it. Under torch.fx symbolic tracing the shape checks become one
    node of the graph (`image_checks`), so a traced model still refuses what the model refuses.
    """
    name = getattr(model, "model_name", type(model).__name__)
    spec = (name, getattr(model, "in_chans", None), divisor, min_size,
            None if fixed_size is None else tuple(fixed_size))
    if isinstance(x, torch.fx.Proxy):
        image_checks(x, spec)
        return x.shape[-2], x.shape[-1]
    h, w = image_checks(x, spec)
    weight = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if weight is not None:
        _check_placement(name, x, weight)
    return h, w


def image_checks(x, spec) -> tuple[int, int]:
    """The shape and type checks of check_image_input; `spec` = (name, in_chans, divisor, min_size,
    fixed_size). Wrapped for torch.fx, so a symbolic trace records this call as one node."""
    name, in_chans, divisor, min_size, fixed_size = spec
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point image tensor, got dtype {x.dtype}; "
                         "convert it with x.float() (and normalise it) first")
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected {in_chans} input channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} to change that")
    h, w = x.shape[-2:]
    if fixed_size is not None and (h, w) != tuple(fixed_size):
        raise ValueError(f"{name}: this model only takes {fixed_size[0]}x{fixed_size[1]} inputs, got {h}x{w}")
    if h < min_size or w < min_size or h % divisor or w % divisor:
        need = f"a multiple of {divisor}" if divisor > 1 else "any size"
        raise ValueError(f"{name}: cannot take a {h}x{w} input; height and width must be {need}"
                         f" and at least {min_size}")
    return h, w


torch.fx.wrap("image_checks")


def _check_placement(name: str, x: torch.Tensor, weight: torch.Tensor):
    if x.device != weight.device:
        raise ValueError(f"{name}: the input is on {x.device} but the model's weights are on {weight.device}; "
                         f"move one of them (x.to({str(weight.device)!r}) or model.to({str(x.device)!r}))")
    if x.dtype != weight.dtype and weight.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: the input is {x.dtype} but the model's weights are {weight.dtype}; cast one of "
                         f"them (x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast")


def cached_constant(maxsize: int = 64):
    """lru_cache for functions of sizes (and a device string) that build constant tensors: masks,
    index tables. The tensors are always built outside inference mode and autograd, so one made
    during `torch.inference_mode()` evaluation can later be saved for backward in training."""
    def deco(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args):
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args)
        return cached
    return deco
