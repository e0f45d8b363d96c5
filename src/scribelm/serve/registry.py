"""The model store's former place: it is `scribelm.store` now, below loading and serving."""

from scribelm.store import (  # noqa: F401  (re-exported for code that imports the old name)
    ModelInfo, ModelStore, RegistryError, check_name, default_store_dir, describe_model, find_model_path,
    is_model_directory, resolve_model_path,
)
