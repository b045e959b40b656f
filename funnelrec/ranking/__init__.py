"""The ranking stage (Covington et al. 2016, section 4): orders a few hundred candidates
by expected watch time.

- `model.py`: the ranking network, its features and weighted logistic regression, its
  artifact;
- `training.py`: a ranker's config, training, scoring and evaluation;
- `metrics.py`: weighted per-user loss, AUC, GAUC, calibration;
- `pages.py`: ranking examples built from pages of retrieved candidates.
"""
