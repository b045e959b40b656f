"""Raw logs -> canonical event tables: the MovieLens, KuaiRand and sequence loaders.

    funnelrec data import movielens  DIR|ZIP  --out DATASET   # ml-100k, ml-1m, ml-latest, RecBole
    funnelrec data import kuairand   FILE|DIR --out DATASET   # KuaiRand log rows = impressions
    funnelrec data import sequence   FILE     --out DATASET   # `user item` per line (SASRec)
    funnelrec data import events     MAP.toml --out DATASET   # your own logs, mapped (TOML)

Every loader reads the whole input first (pyarrow.csv, every column as text), converts and
checks it column by column with vectorised kernels, maps raw ids to dense ids and only then
opens a `DatasetWriter`, so bad input never touches the output directory. Errors name the
file, the column and the physical line of the first offending row.

Dense ids: the raw ids of a space are sorted, numerically when every one of them is an
integer and as text otherwise, and numbered from 1 in that order (0 stays padding). The
order does not depend on the order of rows, so the same data always gives the same ids,
and integer ids that are already 1..N keep their value. See docs/data.md for each mapping.

The package, in the order an import runs:

- `reading.py`: `RawFile`, `read_delimited` and `Parsed`, the checked text columns;
- `ids.py`: `dense_ids`, and metadata rows placed at their dense ids;
- `result.py`: `ImportResult`, and the watches and id tables every loader writes;
- `sequence.py`: `import_sequence`;
- `kuairand.py`: `import_kuairand`;
- `movielens.py`: `find_movielens_files`, `import_movielens`;
- `events.py`: `import_events`, streamed through `mapping.py` (the TOML mapping),
  `sources.py` (CSV, TSV, JSON Lines, Parquet in batches) and `values.py` (conversions
  and bad rows); `parquet_append.py` appends row groups to a table file (`data append`).

This file only re-exports the public names, so `from funnelrec.data.loaders import
import_movielens` works as before.
"""

from __future__ import annotations

from funnelrec.data.loaders.events import import_events
from funnelrec.data.loaders.ids import dense_ids
from funnelrec.data.loaders.kuairand import (
    KUAIRAND_OPTIONAL,
    KUAIRAND_REQUIRED,
    KUAIRAND_VIDEO_COLUMNS,
    import_kuairand,
)
from funnelrec.data.loaders.movielens import (
    ML100K_GENRES,
    MovielensFiles,
    find_movielens_files,
    import_movielens,
)
from funnelrec.data.loaders.reading import Parsed, RawFile, read_delimited
from funnelrec.data.loaders.result import ImportResult
from funnelrec.data.loaders.sequence import import_sequence

__all__ = [
    "KUAIRAND_OPTIONAL",
    "KUAIRAND_REQUIRED",
    "KUAIRAND_VIDEO_COLUMNS",
    "ML100K_GENRES",
    "ImportResult",
    "MovielensFiles",
    "Parsed",
    "RawFile",
    "dense_ids",
    "find_movielens_files",
    "import_events",
    "import_kuairand",
    "import_movielens",
    "import_sequence",
    "read_delimited",
]
