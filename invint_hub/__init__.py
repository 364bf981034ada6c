"""invint_hub: interpret CNN representations and their invariances with conditional INNs.

Rombach, Esser, Ommer. Making Sense of CNNs: Interpreting Deep Representations & Their
Invariances with INNs. ECCV 2020.
"""
from .autoencoder import Autoencoder
from .backbones import Backbone
from .cinn import INN, ConditionalINN
from .concepts import FactorINN
from .pipeline import InvariancePipeline

__version__ = "0.1.0"
__all__ = ["Autoencoder", "Backbone", "ConditionalINN", "FactorINN", "INN", "InvariancePipeline", "__version__"]
