"""Drop-in nn modules built on the dynconv ops."""
from .involution import DynamicDWConv2d, Involution2d  # noqa: E402,F401
from .expert import CondConv2d, DRConv2d, DynamicConv2d, ODConv2d  # noqa: E402,F401
