"""The funnel behind an endpoint.

- `recommender.py`: `Recommender`, the funnel in one object: sources -> merge -> ranking
  features -> ranking;
- `package.py`: one artifact directory with everything `Recommender.load` needs;
- `state.py`: live user state in SQLite (recent watches, searches, impressions);
- `inference.py`: `RequestUserTower` and `RequestRanker`, the two models' forward passes
  for one request;
- `memory.py`: the models' embedding tables read from their files, shared by processes;
- `http.py`: the FastAPI service: recommend, events, health, metrics, hot reload;
- `workers.py`: `funnelrec serve --workers N`, several processes on one port;
- `preload.py`: what the workers' forkserver imports once for all of them.
"""
