"""Approximate nearest-neighbour retrieval (Covington et al. 2016, section 3.3): the
candidate model's item embeddings in a maximum inner-product index.

- `index.py`: the FAISS indexes (exact, IVF, IVF-PQ, HNSW, ivfpq_fs) with exclusion of
  already-watched items, saved beside the model;
- `fastscan.py` (`_fastscan.c`): the ivfpq_fs search in C (4-bit codes, SIMD shuffles,
  exact re-rank), loaded with ctypes.
"""
