"""sdar-kernels benchmark suite: speed, memory and roofline of the SDAR loss against eager PyTorch,
torch.compile and Liger-Kernel. Entry point: ``python -m bench [--quick]`` (bench/README.md)."""
