"""usae: Universal Sparse Autoencoders over several vision backbones.

Stages: ``usae.pipeline`` (images -> activation store), ``usae.trainer`` (store -> trained
USAE run), ``usae.analysis`` (run + store -> metrics and report).
"""

__version__ = "0.1.0"
