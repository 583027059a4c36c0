"""seqkern's Triton kernels, one file per op (installed as seqkern.kernels).

Device code only: @triton.jit kernels and the launchers that run them (on CUDA tensors, or on CPU tensors
under the Triton interpreter, see _launch.py). Importing a kernel file defines its kernels and nothing else.
"""
