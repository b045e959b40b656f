"""Candidate generation: the deep retrieval network that gives a user vector u.

The network of Covington et al. 2016, section 3.2:

    inputs                          width
    mean of history item embeddings item_dim    nn.EmbeddingBag (mean), id 0 = padding
    mean of search token embeddings token_dim   (an unordered bag, paper 3.4)
    region, device embeddings       from the features' log rule
    dense demographics              F           gender, logged_in, age ... in [0, 1]
    example age                     1           paper 3.3; set to 0 at serving
        -> concatenated -> tower of ReLU layers -> u [B, d]

Tower depths as in the paper (d = 256 there): 0: linear to d; 1: d; 2: 2d -> d;
3: 4d -> 2d -> d; 4: 8d -> 4d -> 2d -> d. Items are scored by v_j . u with an output item
table v of width d, separate from the input item table unless `tie_embeddings`. With
`item_content` (not the paper's; off by default), v_j is the table's row plus a vector
computed from the item's content at upload (`content.py`), and items outside the
vocabulary get one from their content alone.

    model = CandidateModel(CandidateConfig(dim=64, depth=2), CandidateInputs.from_features(f),
                           label_counts=torch.from_numpy(f.item_label_counts()))
    loss = model.compute_loss(batch)          # training (sampled softmax, logQ correction)
    u = model(batch)                          # serving: example age = 0, [B, d]
    scores = u @ model.item_embeddings().T    # [B, N + 1]; column 0 is padding

The artifact directory a training run writes (see `save_candidate_artifact`):

    ART/config.json                  format version, model config and inputs, training
                                     config and summary, data fingerprint, vocabulary info
    ART/model.safetensors            the state dict (weights and the sampler's buffers)
    ART/item_embeddings.safetensors  "embeddings" float32 [N, d] (rows of vocabulary ids
                                     1..N) and "item_ids" int64 [N] (their dataset item ids);
                                     with `item_content`, every other catalogue item after
                                     those (its content vector), as the index must hold

The modules:
- `model.py`: `CandidateConfig`, `CandidateInputs`, `bag_mean`, `CandidateModel`;
- `content.py`: the item content tower, `ContentInputs`, `ContentEncoder`, `VocabContent`;
- `artifacts.py`: the artifact's format and file names, `save_candidate_artifact`,
  `load_candidate_model`, `load_item_embeddings`, `features_meta`, `check_features`,
  `user_vectors`, `split_user_vectors`, `synthetic_batch`;
- `training.py`: `CandidateTrainingConfig`, `load_training_config`, `checkpoint_path`,
  `fit_candidates`.

This file only re-exports the public names, so `from funnelrec.candidates import
CandidateModel` works as before.
"""

from __future__ import annotations

from funnelrec.candidates.artifacts import (
    CONFIG_FILE,
    FORMAT_VERSION,
    INDEX_DIR,
    ITEM_EMBEDDINGS_FILE,
    KIND,
    WEIGHTS_FILE,
    UserVectors,
    check_features,
    features_meta,
    load_candidate_model,
    load_item_embeddings,
    read_candidate_config,
    save_candidate_artifact,
    split_user_vectors,
    synthetic_batch,
    user_vectors,
    vocab_digest,
)
from funnelrec.candidates.content import ContentEncoder, ContentInputs
from funnelrec.candidates.model import (
    SPARSE_AUTO_ROWS,
    CandidateConfig,
    CandidateInputs,
    CandidateModel,
    bag_mean,
)
from funnelrec.candidates.training import (
    CandidateTrainingConfig,
    checkpoint_path,
    fit_candidates,
    load_training_config,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "INDEX_DIR",
    "ITEM_EMBEDDINGS_FILE",
    "KIND",
    "SPARSE_AUTO_ROWS",
    "WEIGHTS_FILE",
    "CandidateConfig",
    "CandidateInputs",
    "CandidateModel",
    "CandidateTrainingConfig",
    "ContentEncoder",
    "ContentInputs",
    "UserVectors",
    "bag_mean",
    "check_features",
    "checkpoint_path",
    "features_meta",
    "fit_candidates",
    "load_candidate_model",
    "load_item_embeddings",
    "load_training_config",
    "read_candidate_config",
    "save_candidate_artifact",
    "split_user_vectors",
    "synthetic_batch",
    "user_vectors",
    "vocab_digest",
]
