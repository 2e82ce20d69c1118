"""Drop-in nn modules built on the dynconv ops; ``dynconv.nn.peers`` loads the public implementations' weights."""
from . import peers
from .attention import NeighborhoodAttention2d
from .expert import CondConv2d, DRConv2d, DynamicConv2d, ODConv2d
from .involution import DynamicDWConv2d, Involution2d

__all__ = ["Involution2d", "DynamicDWConv2d", "CondConv2d", "DynamicConv2d", "ODConv2d", "DRConv2d",
           "NeighborhoodAttention2d", "peers"]
