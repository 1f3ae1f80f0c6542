"""timm 1.0.31's `tests/test_models.py`, unmodified, run against our models (see conftest.py).

The file comes from timm's sdist, fetched by pip into a cache the first time; the tests below are
timm's own functions, collected here by name.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TIMM_VERSION = "1.0.31"
CACHE = Path(os.environ.get("FORMERS_TIMM_TESTS", Path(sys.prefix) / f"timm-{TIMM_VERSION}-tests"))


def _timm_test_file() -> Path:
    target = CACHE / "test_models.py"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                            "--no-deps", "--no-binary", ":all:", f"timm=={TIMM_VERSION}", "-d", tmp], check=True)
            sdist = Path(tmp) / f"timm-{TIMM_VERSION}.tar.gz"
            with tarfile.open(sdist) as tar:
                member = tar.extractfile(f"timm-{TIMM_VERSION}/tests/test_models.py")
                data = member.read()
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def _load():
    spec = importlib.util.spec_from_file_location("timm_sdist_test_models", _timm_test_file())
    module = importlib.util.module_from_spec(spec)
    here = Path(__file__).with_name("conftest.py")   # the redirect, by path: every test folder has a conftest.py
    redirect = importlib.util.spec_from_file_location("timm_contract_redirect", here)
    redirect_module = importlib.util.module_from_spec(redirect)
    redirect.loader.exec_module(redirect_module)
    with redirect_module.redirected():
        spec.loader.exec_module(module)
    return module


_timm = _load()

# The tests that need no hub and run over the model list (or name one of our models).
cfg_device = _timm.cfg_device
test_model_forward = _timm.test_model_forward
test_model_backward = _timm.test_model_backward
test_model_default_cfgs = _timm.test_model_default_cfgs
test_model_default_cfgs_non_std = _timm.test_model_default_cfgs_non_std
test_model_forward_features = _timm.test_model_forward_features
test_model_forward_intermediates_features = _timm.test_model_forward_intermediates_features
test_model_forward_intermediates = _timm.test_model_forward_intermediates
test_prune_intermediate_layers_params_used = _timm.test_prune_intermediate_layers_params_used
test_prune_intermediate_layers_contract = _timm.test_prune_intermediate_layers_contract
test_model_forward_fx = _timm.test_model_forward_fx
test_model_backward_fx = _timm.test_model_backward_fx
test_model_forward_torchscript = _timm.test_model_forward_torchscript
test_model_forward_fx_torchscript = _timm.test_model_forward_fx_torchscript
