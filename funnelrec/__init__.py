"""funnelrec: YouTube's two-stage deep recommender (Covington et al., RecSys 2016).

The data flows one way: raw logs -> canonical event tables (`dataset`) -> fitted feature
transforms -> training examples -> models -> index -> `Recommender` -> HTTP.
"""

__version__ = "0.1.0"
