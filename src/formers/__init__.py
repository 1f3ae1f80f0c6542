"""formers: the transformer systems of one paper catalog, in one PyTorch library."""
from .checkpoint import load_checkpoint, read_state_dict, save_checkpoint, save_pretrained
from .flops import count_flops
from .registry import ModelCard, create_model, list_models, list_papers, model_info, register_model
from .bench.optimize import optimize
from . import transforms

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "list_papers", "count_flops",
           "load_checkpoint", "save_checkpoint", "save_pretrained", "read_state_dict", "ModelCard", "register_model",
           "optimize"]
