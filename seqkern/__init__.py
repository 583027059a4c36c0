"""seqkern: hand-written fused kernels for sequence models, behind drop-in torch.nn modules."""
