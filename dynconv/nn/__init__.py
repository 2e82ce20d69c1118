"""Drop-in nn modules built on the dynconv ops."""
