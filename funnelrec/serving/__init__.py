"""The funnel behind an endpoint.

- `recommender.py`: `Recommender`, the funnel in one object: sources -> merge -> ranking
  features -> ranking;
- `package.py`: one artifact directory with everything `Recommender.load` needs;
- `state.py`: live user state in SQLite (recent watches, searches, impressions);
- `inference.py`: `RequestRanker`, the ranker's forward pass for one request's candidates;
- `http.py`: the FastAPI service: recommend, events, health, metrics, hot reload;
- `workers.py`: `funnelrec serve --workers N`, several processes on one port.
"""
