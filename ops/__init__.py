"""Torch ops (torch.ops.dynconv.*): input checks, autograd, fake kernels, reference paths."""
