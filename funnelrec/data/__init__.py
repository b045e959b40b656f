"""Raw logs -> canonical tables: the first stage of the funnel.

- `schema.py`: the five canonical tables (watches, impressions, searches, users, items):
  columns, types, rules;
- `dataset.py`: a dataset directory (`DatasetWriter`, `Dataset`, manifest, id maps) and the
  atomic writes every later stage uses;
- `checks.py`: what opening and first reading a dataset checks its files and values against;
- `loaders/`: MovieLens, KuaiRand and sequence files -> canonical tables;
- `fetch.py`: MovieLens-100k from its publishers;
- `describe.py`: `funnelrec data describe`.

The simulated world (`funnelrec.simulate`) writes the same tables.
"""
