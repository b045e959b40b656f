"""The one training loop both stages share.

- `loop.py`: `train`: optimisers, checkpoints, resume, early stopping;
- `distributed.py`: data-parallel training with torch.distributed (gloo on CPU, nccl on
  CUDA), launched by torchrun;
- `sparse_adam.py`: lazy Adam for sparse embedding tables.
"""
