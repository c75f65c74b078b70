"""The compression methods. Importing this package registers all of them."""

from .fp16 import FP16
from .none import NoCompression
from .qsgd import QSGD
from .randomk import RandomK
from .topk import TopK
from .sign import EFSignSGD, OneBit, SignSGD, Signum

__all__ = ["NoCompression", "FP16", "TopK", "RandomK", "QSGD", "SignSGD", "Signum", "EFSignSGD", "OneBit"]
