"""Drop-in nn modules built on the dynconv ops."""
from .involution import DynamicDWConv2d, Involution2d  # noqa: E402,F401
