"""scribelm: a complete large-language-model system on PyTorch.

    import scribelm
    tok = scribelm.Tokenizer.train(["some text", ...], vocab_size=4096)
    model = scribelm.Transformer(scribelm.ModelConfig.from_preset("tiny"))
    lm = scribelm.load("my-model")
    lm.generate("Once upon a time", temperature=0.8, seed=0)
"""

from scribelm.cache import KVCache
from scribelm.config import PRESETS, ModelConfig
from scribelm.errors import ScribeError
from scribelm.lm import LM, load
from scribelm.model import Transformer
from scribelm.sampling import SamplingSettings
from scribelm.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["KVCache", "LM", "ModelConfig", "PRESETS", "SamplingSettings", "ScribeError", "Tokenizer", "Transformer", "load", "__version__"]
