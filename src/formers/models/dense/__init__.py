"""Dense prediction (semantic segmentation and kin), one file per paper. Importing this package
imports every model file in it, which registers its variants; a new file is picked up without
being listed here."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
