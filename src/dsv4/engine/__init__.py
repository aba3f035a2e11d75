"""Engine integration: ``torch.ops.dsv4`` custom ops, ``DecodeFrontEnd`` and its CUDA-graph decode step."""
