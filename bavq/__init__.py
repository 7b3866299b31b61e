"""bavq: distributed training of VQ image tokenizers (VQ-EMA, BA-VQ).

``bavq.Tokenizer`` is the inference API of a trained tokenizer (imported lazily, so ``import bavq``
and the config module stay light).
"""

__version__ = "0.1.0"
__all__ = ["Tokenizer", "__version__"]


def __getattr__(name: str):
    if name == "Tokenizer":
        from bavq.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'bavq' has no attribute '{name}'")
