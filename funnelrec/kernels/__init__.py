"""The training kernels the models use, with their C sources.

- `bags.py`: weighted bag sums of embedding rows and their gradients;
- `rowsum.py` (`_rowsum.c`): row sums in C for bags and the dense gradients of gathers;
- `softmax.py` (`_rowsoftmax.c`): the candidate model's loss, the sampled softmax with the
  logQ correction (Covington et al. 2016, section 3.1), and its fused row pass in C;
- `native.py`: loads the optional C extensions with ctypes (`_levels.h` is their shared
  instruction-set choice, also used by the ANN scan kernel).

Each kernel has a torch fallback, used where no C compiler was at hand at install.
"""
