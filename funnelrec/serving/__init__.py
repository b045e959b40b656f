"""The funnel behind an endpoint.

- `recommender.py`: `Recommender`, the funnel in one object: sources -> merge -> ranking
  features -> ranking;
- `package.py`: one artifact directory with everything `Recommender.load` needs;
- `state.py`: live user state in SQLite (recent watches, searches, impressions);
- `http.py`: the FastAPI service: recommend, events, health, metrics, hot reload.
"""
