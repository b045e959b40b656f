"""Raw logs -> canonical tables: the first stage of the funnel.

- `schema.py`: the five canonical tables (watches, impressions, searches, users, items):
  columns, types, rules;
- `dataset.py`: a dataset directory (`DatasetWriter`, `Dataset`, manifest, id maps) and the
  atomic writes every later stage uses;
- `checks.py`: what opening and first reading a dataset checks its files and values against;
- `loaders/`: MovieLens, KuaiRand, sequence files and a user's own event logs (a TOML
  mapping of CSV, TSV, Parquet or JSON Lines columns) -> canonical tables;
- `append.py`: a new period of logs appended to a dataset (`funnelrec data append`);
- `fetch.py`: MovieLens-100k from its publishers;
- `describe.py`: `funnelrec data describe`.

The simulated world (`funnelrec.simulate`) writes the same tables.
"""
