"""A seeded simulator of a YouTube-like video platform that keeps its ground truth.

    funnelrec simulate --preset small --seed 0 --out data/small [key=value ...]

    from funnelrec.simulate import preset_config, generate
    result = generate(preset_config("tiny", ["days=7"]), seed=0, out=Path("tiny"))

It writes the canonical tables of `schema` (users, items, watches, searches, impressions,
plus id maps) through `DatasetWriter`, and the latent world to DIR/truth/ (see `truth`).

The world: topics with their own token vocabularies; channels on one or two topics;
items with an upload time (some before the window, the rest spread over every hour of
it), a log-normal duration by topic, latent quality and clickbait (independent), a
heavy-tailed appeal and, for a share of them, a series and an episode number. Users have
demographics, an interest mixture over topics drawn around a prior that depends on them,
a taste vector, and a heavy-tailed activity.

Each simulated day a user has Poisson(activity x sessions_per_day) sessions, each one of:
  home      the logging policy shows a slate mixing popular, fresh and noisily
            personalised items; each is clicked with the truth's click probability
            (times already shown included) and watched for duration x completion;
  search    a topic from the user's interests, a query of 1-3 of its tokens, and watches
            of the topic's items picked by the user's own choice (popularity x taste);
  external  a watch of a globally popular (fresh) item, with no impression.
A session's last watch may continue into "related" watches: the next episode of a series
far more often than the previous one, otherwise an item of the same topic, leaning to
the less popular (popular -> niche).

Generation streams over blocks of users (each block runs the whole window, so a user's
history is complete in one place and "times shown" is exact), so memory depends on
`block_user_days` and not on the number of events. Each block has its own random stream
derived from the seed: the same seed and config give byte-identical tables. Events in
the tables are ordered by user_id, then time.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from funnelrec.config import apply_overrides
from funnelrec.dataset import DatasetWriter
from funnelrec.errors import FunnelrecError
from funnelrec.progress import progress_bar
from funnelrec.truth import DAY_S, MAX_SEARCH_WATCHES, UserModel, World, order_by

I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

TOPIC_NAMES = (
    "music", "gaming", "cooking", "travel", "fitness", "comedy", "science", "history",
    "tech_reviews", "cars", "football", "basketball", "fashion", "beauty", "diy",
    "gardening", "pets", "news", "politics", "finance", "education", "programming",
    "movies", "anime", "documentaries", "kids", "asmr", "vlogs", "parenting", "art",
    "photography", "dance", "yoga", "fishing", "hunting", "camping", "space", "math",
    "languages", "religion", "true_crime", "podcasts", "esports", "chess", "motorsport",
    "cycling", "home_improvement", "real_estate", "crypto", "weddings",
)  # fmt: skip
REGIONS = ("US", "IN", "BR", "ID", "MX", "JP", "DE", "GB", "FR", "NG")
REGION_P = (0.22, 0.18, 0.12, 0.09, 0.08, 0.08, 0.07, 0.06, 0.05, 0.05)
DEVICES = ("mobile", "desktop", "tv", "tablet")
DEVICE_P = (0.55, 0.25, 0.12, 0.08)
GENDERS = ("female", "male")
AGE_BINS = (13, 18, 25, 35, 50, 80)  # edges: bins [13,18), [18,25), ..., [50,80)
AGE_P = (0.12, 0.25, 0.25, 0.23, 0.15)
# Sessions by hour of day (UTC): quiet at night, peak in the evening.
DIURNAL = np.array(
    [2, 1.5, 1, 1, 1, 1.5, 2, 3, 3.5, 4, 4, 4.5, 5, 5, 5, 5, 5.5, 6, 7, 8, 8.5, 8, 6, 4]
)
DIURNAL = DIURNAL / DIURNAL.sum()
HOME, SEARCH, EXTERNAL, RELATED = 0, 1, 2, 3
SOURCES = ("home", "search", "external", "related")  # watch source by code


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes a simulated world; presets in `PRESETS`, overrides key=value."""

    # Size and time window (UTC; the window starts at 00:00 of `start`).
    n_users: int = 20_000
    n_items: int = 10_000
    days: int = 28
    start: str = "2026-01-01"
    # Topics and their vocabularies (titles and queries draw from them).
    n_topics: int = 50
    tokens_per_topic: int = 60
    generic_tokens: int = 20  # shared by all topics ("best", "new", ...): noise in queries
    generic_token_share: float = 0.15  # chance a query word is generic
    # Channels: about this many items each (heavy-tailed), on one or two topics.
    items_per_channel: int = 25
    channel_second_topic: float = 0.35
    item_second_topic: float = 0.25  # chance an item of a 2-topic channel is on the second
    # Series: share of items that are episodes, mean episodes per series.
    series_share: float = 0.25
    series_mean_length: float = 8.0
    # Uploads: a share before the window (up to pre_window_days before), the rest spread
    # evenly over every hour of the window.
    pre_window_share: float = 0.3
    pre_window_days: int = 60
    # Duration: log-normal; each topic's median is log-normal around duration_median_s.
    duration_median_s: float = 420.0
    duration_topic_sigma: float = 0.6
    duration_sigma: float = 0.7
    # Base appeal = exp(N(0, appeal_sigma)), half from the channel, half from the item.
    appeal_sigma: float = 1.5
    # Dimension of user taste / item style vectors (within-topic preference).
    taste_dim: int = 8
    channel_style_weight: float = 0.6  # correlation of an item's style with its channel's
    # Users: share logged in (logged-out users have no age or gender in the users table).
    logged_in_share: float = 0.75
    # Interest mixture ~ Dirichlet(interest_concentration x prior(demographics)); the
    # demographic effects on the prior's logits are scaled by demo_effect.
    interest_concentration: float = 3.0
    demo_effect: float = 1.5
    # Activity: log-normal with mean 1 and this sigma multiplies sessions_per_day.
    activity_sigma: float = 1.4
    sessions_per_day: float = 1.1
    # Session kinds (external gets the rest).
    home_share: float = 0.55
    search_share: float = 0.2
    # Home page logging policy: slate size; slot sources (personalised gets the rest);
    # its topic choice mixes the true interests with uniform noise (more when logged out).
    slate_size: int = 10
    policy_popular: float = 0.3
    policy_fresh: float = 0.2
    policy_noise: float = 0.3
    policy_noise_logged_out: float = 0.7
    fresh_window_hours: int = 48
    # Search: watches per search ~ Poisson(search_watches_mean), at most MAX_SEARCH_WATCHES.
    search_watches_mean: float = 1.1
    # Candidates resampled by taste when a user picks an item themselves (search, related).
    taste_candidates: int = 4
    # Related continuation after a session's last watch.
    related_continue: float = 0.45
    related_next_episode: float = 0.7
    related_prev_episode: float = 0.03
    related_niche: float = 0.7  # weight appeal^-related_niche among same-topic candidates
    max_chain: int = 15
    gap_s: int = 15  # seconds between consecutive watches
    # Streaming: users per block = block_user_days // days; bounds memory, not output.
    block_user_days: int = 300_000
    user_model: UserModel = field(default_factory=UserModel)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def window_start(self) -> int:
        d = dt.date.fromisoformat(self.start)
        return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp())

    @property
    def users_per_block(self) -> int:
        return max(1, self.block_user_days // self.days)


_AT_LEAST_ONE = (
    "n_users", "n_items", "days", "n_topics", "tokens_per_topic", "slate_size",
    "items_per_channel", "taste_dim", "taste_candidates", "block_user_days",
)  # fmt: skip
_SHARES = (
    "generic_token_share", "channel_second_topic", "item_second_topic", "series_share",
    "pre_window_share", "channel_style_weight", "logged_in_share", "home_share",
    "search_share", "policy_popular", "policy_fresh", "policy_noise",
    "policy_noise_logged_out", "related_continue", "related_next_episode",
    "related_prev_episode",
)  # fmt: skip
_NON_NEGATIVE = (
    "duration_topic_sigma", "duration_sigma", "appeal_sigma", "demo_effect",
    "activity_sigma", "sessions_per_day", "search_watches_mean", "related_niche",
)  # fmt: skip


def _validate(c: SimConfig) -> None:
    def bad(key: str, why: str) -> FunnelrecError:
        return FunnelrecError(f"config: {key} {why}")

    for key in _AT_LEAST_ONE:
        if getattr(c, key) < 1:
            raise bad(key, f"must be >= 1, got {getattr(c, key)}")
    for key in ("generic_tokens", "pre_window_days", "fresh_window_hours", "max_chain", "gap_s"):
        if getattr(c, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(c, key)}")
    for key in _SHARES:
        v = getattr(c, key)
        if not 0.0 <= v <= 1.0:
            raise bad(key, f"must be in [0, 1], got {v}")
    for key in ("duration_median_s", "interest_concentration", "series_mean_length"):
        if getattr(c, key) <= 0:
            raise bad(key, f"must be > 0, got {getattr(c, key)}")
    for key in _NON_NEGATIVE:
        if getattr(c, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(c, key)}")
    if c.home_share + c.search_share > 1:
        raise bad("home_share + search_share", "must be <= 1")
    if c.policy_popular + c.policy_fresh > 1:
        raise bad("policy_popular + policy_fresh", "must be <= 1")
    if c.related_next_episode + c.related_prev_episode > 1:
        raise bad("related_next_episode + related_prev_episode", "must be <= 1")
    if c.generic_token_share > 0 and c.generic_tokens == 0:
        raise bad("generic_token_share", "needs generic_tokens >= 1")
    try:
        dt.date.fromisoformat(c.start)
    except ValueError:
        raise bad("start", f"must be a date YYYY-MM-DD, got '{c.start}'") from None
    m = c.user_model
    if m.completion_clickbait > 0:
        raise bad("user_model.completion_clickbait", "must be <= 0 (clickbait never helps)")
    if m.fresh_half_life_days <= 0 or m.fresh_boost < 0:
        raise bad("user_model.fresh_*", "half-life must be > 0 and boost >= 0")
    # Popularity sums scale freshness by 2^(span / half-life): keep it in float range.
    if (c.days + c.pre_window_days) / m.fresh_half_life_days > 900:
        raise bad("user_model.fresh_half_life_days", "is too short for days + pre_window_days")
    if m.completion_concentration <= 0 or m.interest_floor <= 0:
        raise bad("user_model", "completion_concentration and interest_floor must be > 0")


PRESETS: dict[str, SimConfig] = {
    # tests: about 20k watches in well under 2 s
    "tiny": SimConfig(
        n_users=500, n_items=1_000, days=28, tokens_per_topic=20, items_per_channel=10
    ),
    # the demo: about 1M watches in under a minute on 2 cores
    "small": SimConfig(n_users=20_000, n_items=10_000, days=28),
    # experiments and benchmarks: about 10M watches
    "medium": SimConfig(n_users=200_000, n_items=100_000, days=28, tokens_per_topic=120),
    # scale (issue 10): >= 100M watches, streamed in blocks
    "large": SimConfig(n_users=1_000_000, n_items=1_000_000, days=56, tokens_per_topic=400),
}


def preset_config(name: str, overrides: Sequence[str] = ()) -> SimConfig:
    """The config of preset `name` with `key=value` overrides applied."""
    if name not in PRESETS:
        raise FunnelrecError(f"unknown preset '{name}' (expected one of {', '.join(PRESETS)})")
    return apply_overrides(PRESETS[name], overrides)


# -- the world -------------------------------------------------------------------------


def build_world(config: SimConfig, seed: int, preset: str | None = None) -> World:
    """Draw the latent world (topics, channels, items, users) for a seed."""
    c = config
    rng = np.random.default_rng([seed, 0])
    T, n_items, n_users, d = c.n_topics, c.n_items, c.n_users, c.taste_dim
    start = c.window_start
    topics = [TOPIC_NAMES[t] if t < len(TOPIC_NAMES) else f"topic{t + 1}" for t in range(T)]
    words = _pseudo_words(rng, T * c.tokens_per_topic + c.generic_tokens)
    vocab = [words[t * c.tokens_per_topic : (t + 1) * c.tokens_per_topic] for t in range(T)]
    generic = words[T * c.tokens_per_topic :]
    topic_logit = rng.normal(0.0, 0.7, T)
    topic_p = _softmax(topic_logit)

    # Channels: heavy-tailed sizes, a primary topic and maybe a second one.
    n_ch = max(T, round(n_items / c.items_per_channel))
    ch_weight = rng.lognormal(0.0, 1.0, n_ch)
    ch_weight /= ch_weight.sum()
    ch_primary = rng.choice(T, n_ch, p=topic_p).astype(np.int32)
    ch_secondary = np.where(
        rng.random(n_ch) < c.channel_second_topic,
        (ch_primary + rng.integers(1, max(T, 2), n_ch)) % T,
        -1,
    ).astype(np.int32)
    if T == 1:
        ch_secondary[:] = -1
    ch_style = rng.normal(0.0, 1.0, (n_ch, d))
    ch_appeal = rng.normal(0.0, 1.0, n_ch)

    # Items: series episodes first (channel and topic from their series), then the rest.
    n_series_items = round(c.series_share * n_items)
    n_series = max(1, round(n_series_items / c.series_mean_length)) if n_series_items else 0
    series_channel = rng.choice(n_ch, n_series, p=ch_weight)
    series_of = rng.integers(0, max(n_series, 1), n_series_items)
    series_style = rng.normal(0.0, 1.0, (max(n_series, 1), d))
    channel = np.concatenate(
        [series_channel[series_of], rng.choice(n_ch, n_items - n_series_items, p=ch_weight)]
    )
    second = (ch_secondary[channel] >= 0) & (rng.random(n_items) < c.item_second_topic)
    second[:n_series_items] = False
    topic = np.where(second, ch_secondary[channel], ch_primary[channel]).astype(np.int32)
    series_raw = np.concatenate([series_of + 1, np.zeros(n_items - n_series_items, np.int64)])

    pre = rng.random(n_items) < c.pre_window_share
    n_win = int((~pre).sum())
    hours = rng.permutation(np.arange(n_win) % (c.days * 24))
    upload = np.empty(n_items, dtype=np.int64)
    upload[~pre] = start + hours * 3600 + rng.integers(0, 3600, n_win)
    upload[pre] = start - rng.integers(1, max(c.pre_window_days, 1) * DAY_S + 1, int(pre.sum()))

    topic_mu = math.log(c.duration_median_s) + c.duration_topic_sigma * rng.normal(size=T)
    duration = np.exp(topic_mu[topic] + c.duration_sigma * rng.normal(size=n_items))
    duration = np.round(np.clip(duration, 15.0, 4 * 3600.0)).astype(np.float32)
    quality = rng.normal(size=n_items).astype(np.float32)
    clickbait = rng.normal(size=n_items).astype(np.float32)
    log_appeal = c.appeal_sigma * (
        math.sqrt(0.5) * ch_appeal[channel] + math.sqrt(0.5) * rng.normal(size=n_items)
    )
    own = rng.normal(0.0, 1.0, (n_items, d))
    own[:n_series_items] = series_style[series_of]  # episodes of a series look alike
    rho = c.channel_style_weight
    style = (rho * ch_style[channel] + math.sqrt(1 - rho**2) * own) / math.sqrt(d)

    # Dense item ids in upload order; episodes numbered by upload within their series.
    order = order_by(upload)
    channel, topic, upload = channel[order], topic[order], upload[order]
    duration, quality, clickbait = duration[order], quality[order], clickbait[order]
    log_appeal, style, series_raw = log_appeal[order], style[order], series_raw[order]
    # renumber series densely (1..S) by first appearance, drop the empty ones
    has = series_raw > 0
    _, first, inverse = np.unique(series_raw[has], return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    series_id = np.zeros(n_items, dtype=np.int64)
    series_id[has] = rank[inverse] + 1
    episode = np.zeros(n_items, dtype=np.int32)
    idx = np.flatnonzero(has)
    by_series = idx[order_by(series_id[idx])]  # ties keep upload order
    episode[by_series] = _cumcount(series_id[by_series]) + 1

    # Users: demographics, interests around a demographic prior, taste, activity.
    age_bin = rng.choice(len(AGE_P), n_users, p=AGE_P)
    lo, hi = np.array(AGE_BINS[:-1]), np.array(AGE_BINS[1:])
    age = np.floor(lo[age_bin] + rng.random(n_users) * (hi - lo)[age_bin]).astype(np.float32)
    gender = rng.integers(0, 2, n_users)
    region = rng.choice(len(REGIONS), n_users, p=REGION_P)
    device = rng.choice(len(DEVICES), n_users, p=DEVICE_P)
    logged_in = rng.random(n_users) < c.logged_in_share
    eff = c.demo_effect
    age_eff = rng.normal(0, 1.0 * eff, (len(AGE_P), T))
    gender_eff = rng.normal(0, 0.8 * eff, (2, T))
    region_eff = rng.normal(0, 0.6 * eff, (len(REGIONS), T))
    device_eff = rng.normal(0, 0.4 * eff, (len(DEVICES), T))
    interest = np.empty((n_users, T), dtype=np.float32)
    chunk = 1 << 16
    for lo_u in range(0, n_users, chunk):
        s = slice(lo_u, lo_u + chunk)
        logit = topic_logit + age_eff[age_bin[s]] + gender_eff[gender[s]]
        logit = logit + region_eff[region[s]] + device_eff[device[s]]
        g = rng.gamma(c.interest_concentration * _softmax(logit)) + 1e-12
        interest[s] = g / g.sum(axis=1, keepdims=True)
    taste = rng.normal(size=(n_users, d)).astype(np.float32)
    sig = c.activity_sigma
    activity = rng.lognormal(-0.5 * sig * sig, sig, n_users).astype(np.float32)

    meta: dict[str, Any] = {
        "seed": seed,
        "preset": preset,
        "config": asdict(c),
        "topics": topics,
        "vocab": vocab,
        "generic_tokens": generic,
        "window_start": start,
        "window_end": start + c.days * DAY_S,
        "regions": list(REGIONS),
        "devices": list(DEVICES),
        "genders": list(GENDERS),
    }
    return World(
        meta=meta,
        model=c.user_model,
        users={
            "interest": interest,
            "taste": taste,
            "activity": activity,
            "age": age,
            "gender": np.asarray(GENDERS, dtype=object)[gender].astype(str),
            "region": np.asarray(REGIONS)[region],
            "device": np.asarray(DEVICES)[device],
            "logged_in": logged_in,
        },
        items={
            "topic": topic,
            "channel_id": (channel + 1).astype(np.int64),
            "upload_ts": upload,
            "duration_s": duration,
            "quality": quality,
            "clickbait": clickbait,
            "appeal": np.exp(log_appeal).astype(np.float32),
            "series_id": series_id,
            "episode": episode,
            "style": style.astype(np.float32),
        },
        channels={
            "primary_topic": ch_primary,
            "secondary_topic": ch_secondary,
            "style": ch_style.astype(np.float32),
        },
    )


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable lower-case words (token vocabularies)."""
    cons = [*"bdfgklmnprstvz", "ch", "sh", "th"]
    vows = ["a", "e", "i", "o", "u", "ai", "ou"]
    syl = np.array([a + b for a in cons for b in vows])
    seen: dict[str, None] = {}
    while len(seen) < n:
        k = max(n - len(seen), 16) * 2
        n_syl = rng.integers(2, 4, k)
        parts = syl[rng.integers(0, syl.size, (k, 3))]
        for row, m in zip(parts, n_syl, strict=True):
            seen.setdefault("".join(row[:m]), None)
    return list(seen)[:n]


def _softmax(x: NDArray[Any]) -> F64:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _cumcount(sorted_keys: NDArray[Any]) -> I64:
    """Position of each element within its run of equal keys (keys already grouped)."""
    n = sorted_keys.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = np.flatnonzero(new)
    return np.arange(n) - starts[np.cumsum(new) - 1]


# -- events ----------------------------------------------------------------------------


@dataclass
class _Watches:
    user: I64
    item: I64
    ts: I64
    watch_time: NDArray[np.float32]
    source: NDArray[np.int8]

    @staticmethod
    def concat(parts: Sequence[_Watches]) -> _Watches:
        cols = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Watches)
        }
        return _Watches(**cols)

    def take(self, rows: I64 | slice) -> _Watches:
        return _Watches(**{f.name: getattr(self, f.name)[rows] for f in fields(_Watches)})


class _BlockSimulator:
    """Simulates all sessions of one block of users over the whole window."""

    def __init__(self, world: World, config: SimConfig, rng: np.random.Generator) -> None:
        self.w = world
        self.c = config
        self.rng = rng
        self.T = len(world.topics)

    # item draws ---------------------------------------------------------------------

    def _watch_time(self, u: I64, i: I64) -> NDArray[np.float32]:
        return self.w._draw_watch_time(self.rng, u, i)

    def _interest_index(self, lo: int, hi: int) -> None:
        """Cumulative interests of the block's users, row u offset by u: one sorted array."""
        cum = np.cumsum(self.w.interest[lo:hi].astype(np.float64), axis=1)
        cum /= cum[:, -1:]
        self._lo = lo
        self._cum = (cum + np.arange(hi - lo)[:, None]).ravel()

    def _topics(self, users: I64, noise: F64 | float) -> I64:
        """[N] topics drawn from each user's interests, or uniformly with prob. `noise`."""
        n = users.size
        local = users - self._lo
        r = self.rng.random((2, n))
        j = np.searchsorted(self._cum, local + r[0], side="right") - local * self.T
        uniform = self.rng.integers(0, self.T, n)
        return np.where(r[1] < noise, uniform, np.clip(j, 0, self.T - 1))

    def _pick(self, users: I64, cands: I64, extra: F64 | None = None) -> I64:
        """[N] one of the M candidates [N, M] per user, ~ exp(taste_weight x taste match).

        Sampling-importance-resampling: candidates come from the topic's popularity, so
        the pick approximates popularity x exp(taste) (`World._own_choice`).
        -1 where no candidate is valid.
        """
        n, m = cands.shape
        logits = np.empty((n, m), dtype=np.float64)
        beta = self.w.model.taste_weight
        for j in range(m):
            c = np.maximum(cands[:, j], 0)
            logits[:, j] = beta * self.w._taste(users, c)
        if extra is not None:
            logits += extra
        logits += self.rng.gumbel(size=(n, m))
        logits[cands < 0] = -np.inf
        best = np.argmax(logits, axis=1)
        out = cands[np.arange(n), best]
        return np.where(np.isfinite(logits[np.arange(n), best]), out, -1)

    def _own_choice(self, users: I64, ts: I64, topics: I64) -> I64:
        m = self.c.taste_candidates
        cands = self.w.popularity.draw(self.rng, np.repeat(ts, m), np.repeat(topics, m))
        return self._pick(users, cands.reshape(-1, m))

    def _recent(self, ts: I64) -> I64:
        """[N] uniform draws among items uploaded in the last fresh_window_hours (-1: none)."""
        idx, up, _, _ = self.w.popularity.segments[self.T]
        lo = np.searchsorted(up, ts - self.c.fresh_window_hours * 3600, side="right")
        hi = np.searchsorted(up, ts, side="right")
        j = lo + np.floor(self.rng.random(ts.size) * (hi - lo)).astype(np.int64)
        return np.where(hi > lo, idx[np.minimum(j, idx.size - 1)], -1)

    # sessions -------------------------------------------------------------------------

    def run(self, lo: int, hi: int) -> dict[str, Any]:
        c, w, rng = self.c, self.w, self.rng
        users = np.arange(lo, hi, dtype=np.int64)
        days = c.days
        rate = w.users["activity"][lo:hi].astype(np.float64) * c.sessions_per_day
        counts = rng.poisson(np.repeat(rate, days)).ravel()
        s_user = np.repeat(np.repeat(users, days), counts)
        s_day = np.repeat(np.tile(np.arange(days, dtype=np.int64), hi - lo), counts)
        n = s_user.size
        hour = rng.choice(24, size=n, p=DIURNAL)
        s_ts = w.window_start + s_day * DAY_S + hour * 3600 + rng.integers(0, 3600, n)
        ext = max(0.0, 1.0 - c.home_share - c.search_share)
        kind = rng.choice(3, size=n, p=[c.home_share, c.search_share, ext])
        order = order_by(s_user, s_ts)
        s_user, s_ts, kind = s_user[order], s_ts[order], kind[order]
        self._interest_index(lo, hi)

        home, impressions = self._home(s_user[kind == HOME], s_ts[kind == HOME])
        search, searches = self._search(s_user[kind == SEARCH], s_ts[kind == SEARCH])
        external = self._external(s_user[kind == EXTERNAL], s_ts[kind == EXTERNAL])
        session = np.concatenate(
            [home.pop("session"), search.pop("session"), external.pop("session")]
        )
        kind_of = np.concatenate(
            [np.full(len(home["user"]), HOME), np.full(len(search["user"]), SEARCH),
             np.full(len(external["user"]), EXTERNAL)]
        )  # fmt: skip
        seeds = _Watches.concat([_Watches(**home), _Watches(**search), _Watches(**external)])
        # Session keys must not collide across kinds: offset them by kind.
        skey = session * 3 + kind_of
        related = self._related(seeds, skey)
        watches = _Watches.concat([seeds, related])
        o = order_by(watches.user, watches.ts)
        watches = watches.take(o)
        return {"watches": watches, "searches": searches, "impressions": impressions}

    def _home(self, r_user: I64, r_ts: I64) -> tuple[dict[str, Any], dict[str, Any]]:
        """Slates of the logging policy, clicks and their watches."""
        c, w, rng = self.c, self.w, self.rng
        n_req = r_user.size
        slots = c.slate_size + 3  # over-draw, duplicates within a slate are dropped
        req = np.repeat(np.arange(n_req, dtype=np.int64), slots)
        iu, it = r_user[req], r_ts[req]
        pers = max(0.0, 1.0 - c.policy_popular - c.policy_fresh)
        src = rng.choice(3, size=req.size, p=[c.policy_popular, c.policy_fresh, pers])
        item = np.full(req.size, -1, dtype=np.int64)
        sel = src == 1
        item[sel] = self._recent(it[sel])
        sel = src == 2
        noise = w._policy_noise[iu[sel]]  # more noise for logged-out users
        item[sel] = w.popularity.draw(rng, it[sel], self._topics(iu[sel], noise))
        sel = item < 0  # popular slots, and fallbacks where a slot found nothing
        item[sel] = w.popularity.draw(rng, it[sel], self.T)
        # Drop duplicates within a slate, shuffle, keep the first slate_size.
        ok = item >= 0
        req, iu, it, item = req[ok], iu[ok], it[ok], item[ok]
        o = order_by(req, item)
        first = np.ones(o.size, dtype=bool)
        first[1:] = (req[o][1:] != req[o][:-1]) | (item[o][1:] != item[o][:-1])
        o = np.sort(o[first])
        req, iu, it, item = req[o], iu[o], it[o], item[o]
        o = order_by(req, rng.integers(0, 1 << 16, req.size))
        req, iu, it, item = req[o], iu[o], it[o], item[o]
        pos = _cumcount(req)
        keep = pos < c.slate_size
        req, iu, it, item, pos = req[keep], iu[keep], it[keep], item[keep], pos[keep]
        # How often this item was already shown to this user (earlier requests).
        # Rows are in time order per user, so ties in (user, item) keep time order.
        o = order_by(iu, item)
        shown = np.empty(req.size, dtype=np.int64)
        shown[o] = _cumcount(iu[o] * w.n_items + item[o])
        clicked, wt = w._respond(rng, iu, item, it, shown)
        impressions = {"req": req, "user": iu, "item": item, "ts": it, "position": pos,
                       "clicked": clicked, "watch_time": wt, "n_requests": n_req}  # fmt: skip
        # Clicked items are watched one after another, in slate order.
        cr = req[clicked]
        watches = {
            "user": iu[clicked],
            "item": item[clicked],
            "ts": _sequential_ts(cr, it[clicked], wt[clicked], c.gap_s),
            "watch_time": wt[clicked],
            "source": np.full(cr.size, HOME, dtype=np.int8),
            "session": cr,
        }
        return watches, impressions

    def _search(self, q_user: I64, q_ts: I64) -> tuple[dict[str, Any], dict[str, Any]]:
        """Queries from a topic of interest, then watches of that topic's items."""
        c, rng = self.c, self.rng
        n_q = q_user.size
        topic = self._topics(q_user, 0.0)
        length = rng.choice(3, size=n_q, p=[0.35, 0.45, 0.2]) + 1
        V = c.tokens_per_topic
        zipf = 1.0 / np.arange(1, V + 1) ** 0.8
        zipf_cum = np.cumsum(zipf / zipf.sum())
        tokens = np.full((n_q, 3), -1, dtype=np.int64)
        for j in range(3):
            tok = topic * V + np.minimum(np.searchsorted(zipf_cum, rng.random(n_q)), V - 1)
            generic = rng.random(n_q) < c.generic_token_share
            g = self.T * V + rng.integers(0, max(c.generic_tokens, 1), n_q)
            tok = np.where(generic, g, tok)
            dup = (tokens[:, :j] == tok[:, None]).any(axis=1)
            tokens[:, j] = np.where((j < length) & ~dup, tok, -1)
        searches = {"user": q_user, "ts": q_ts, "tokens": tokens}
        n_res = np.minimum(rng.poisson(c.search_watches_mean, n_q), MAX_SEARCH_WATCHES)
        sess = np.repeat(np.arange(n_q, dtype=np.int64), n_res)
        u = q_user[sess]
        item = self._own_choice(u, q_ts[sess], topic[sess])
        ok = item >= 0
        sess, u, item = sess[ok], u[ok], item[ok]
        wt = self._watch_time(u, item)
        watches = {
            "user": u,
            "item": item,
            "ts": _sequential_ts(sess, q_ts[sess], wt, c.gap_s),
            "watch_time": wt,
            "source": np.full(sess.size, SEARCH, dtype=np.int8),
            "session": sess,
        }
        return watches, searches

    def _external(self, e_user: I64, e_ts: I64) -> dict[str, Any]:
        """Embedded-player watches of globally popular, fresh items."""
        item = self.w.popularity.draw(self.rng, e_ts, self.T)
        ok = item >= 0
        u, t, item = e_user[ok], e_ts[ok], item[ok]
        return {
            "user": u,
            "item": item,
            "ts": t,
            "watch_time": self._watch_time(u, item),
            "source": np.full(u.size, EXTERNAL, dtype=np.int8),
            "session": np.flatnonzero(ok).astype(np.int64),
        }

    def _related(self, seeds: _Watches, session: I64) -> _Watches:
        """Continuation chains after each session's last watch."""
        c, w, rng = self.c, self.w, self.rng
        if seeds.user.size == 0:
            return seeds
        o = order_by(session, seeds.ts)
        last = np.ones(o.size, dtype=bool)
        last[:-1] = session[o][1:] != session[o][:-1]
        o = o[last]
        user, item = seeds.user[o], seeds.item[o]
        t = seeds.ts[o] + np.ceil(seeds.watch_time[o]).astype(np.int64) + c.gap_s
        out: list[_Watches] = []
        for _ in range(c.max_chain):
            go = (rng.random(user.size) < c.related_continue) & (t < w.window_end)
            user, item, t = user[go], item[go], t[go]
            if user.size == 0:
                break
            r = rng.random(user.size)
            nxt, prv = w.next_episode[item], w.prev_episode[item]
            use_next = (nxt >= 0) & (r < c.related_next_episode)
            use_next &= w.upload_ts[np.maximum(nxt, 0)] <= t
            p_prev_hi = c.related_next_episode + c.related_prev_episode
            use_prev = ~use_next & (prv >= 0) & (r >= c.related_next_episode) & (r < p_prev_hi)
            m = c.taste_candidates
            cands = w.popularity.draw(rng, np.repeat(t, m), np.repeat(w.topic[item], m))
            cands = cands.reshape(-1, m)
            cands[cands == item[:, None]] = -1
            niche = -c.related_niche * w.log_appeal[np.maximum(cands, 0)].astype(np.float64)
            new = self._pick(user, cands, niche)
            new = np.where(use_next, nxt, np.where(use_prev, prv, new))
            ok = new >= 0
            user, item, t = user[ok], new[ok], t[ok]
            wt = self._watch_time(user, item)
            out.append(_Watches(user, item, t, wt, np.full(user.size, RELATED, dtype=np.int8)))
            t = t + np.ceil(wt).astype(np.int64) + c.gap_s
        if not out:
            return seeds.take(slice(0, 0))
        return _Watches.concat(out)


def _sequential_ts(group: I64, start: I64, watch_time: NDArray[np.float32], gap: int) -> I64:
    """Start times of watches made one after another within each group (groups sorted)."""
    step = np.ceil(watch_time).astype(np.int64) + gap
    before = np.cumsum(step) - step
    if group.size == 0:
        return start.copy()
    new = np.ones(group.size, dtype=bool)
    new[1:] = group[1:] != group[:-1]
    base = before[np.flatnonzero(new)][np.cumsum(new) - 1]
    return start + gap + (before - base)


# -- writing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimResult:
    """What `generate` wrote: the dataset path, row counts per table, seconds taken."""

    path: Path
    counts: dict[str, int]
    seconds: float


def _ids(prefix: str, n: int) -> pa.Array:
    ids = pa.array(np.arange(1, n + 1, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), ids, "")


def _join_tokens(strings: pa.Array, tokens: I64, sep: str = " ") -> pa.Array:
    """Rows of token indices (-1 = none) joined into strings."""
    cols = []
    for j in range(tokens.shape[1]):
        col = tokens[:, j]
        cols.append(pc.take(strings, pa.array(col, mask=col < 0)))
    return pc.binary_join_element_wise(*cols, sep, null_handling="skip")


def users_table(world: World) -> pa.Table:
    """The canonical users table (logged-out users have no age or gender)."""
    u = world.users
    li = np.asarray(u["logged_in"], dtype=bool)
    return pa.table(
        {
            "user_id": np.arange(1, world.n_users + 1, dtype=np.int64),
            "age": pa.array(u["age"], mask=~li),
            "gender": pa.array(u["gender"], mask=~li),
            "region": pa.array(u["region"]),
            "device": pa.array(u["device"]),
            "logged_in": pa.array(li),
        }
    )


def items_table(world: World, rng: np.random.Generator) -> pa.Table:
    """The canonical items table; titles are topic tokens (+ series name and episode)."""
    n = world.n_items
    V = len(world.vocab[0]) if world.vocab else 0
    words = pa.array([t for v in world.vocab for t in v] + world.generic_tokens)
    zipf = 1.0 / np.arange(1, V + 1) ** 0.8
    zipf_cum = np.cumsum(zipf / zipf.sum())
    length = rng.integers(3, 6, n)
    tok = world.topic[:, None].astype(np.int64) * V + np.minimum(
        np.searchsorted(zipf_cum, rng.random((n, 5))), V - 1
    )
    tok[np.arange(5)[None, :] >= length[:, None]] = -1
    for j in range(1, 5):  # no repeated word within a title
        tok[(tok[:, :j] == tok[:, j : j + 1]).any(axis=1), j] = -1
    # A series' name: two distinct tokens of its topic, the same for every episode.
    sid = world.series_id
    first = (sid * 7919) % V
    second = (first + 1 + (sid * 104729) % max(V - 1, 1)) % V
    base = world.topic.astype(np.int64) * V
    is_series = sid > 0
    tok[is_series, 0] = (base + first)[is_series]
    tok[is_series, 1] = np.where(V > 1, base + second, -1)[is_series]
    tok[is_series, 2:] = -1
    title = _join_tokens(words, tok)
    ep = pc.binary_join_element_wise(
        title, pa.scalar("ep"), pa.array(world.episode.astype(np.int64)).cast(pa.string()), " "
    )
    title = pc.if_else(pa.array(is_series), ep, title)
    return pa.table(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "upload_ts": world.upload_ts,
            "duration_s": world.duration_s,
            "channel_id": world.items["channel_id"],
            "topic": pc.take(pa.array(world.topics), pa.array(world.topic)),
            "title": title,
        }
    )


def _blocks(n_users: int, per_block: int) -> Iterator[tuple[int, int, int]]:
    for b, lo in enumerate(range(0, n_users, per_block)):
        yield b, lo, min(n_users, lo + per_block)


def generate(
    config: SimConfig,
    seed: int,
    out: Path | str,
    *,
    preset: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> SimResult:
    """Simulate a world and write it as a dataset (tables + id maps + truth/) at `out`."""
    t0 = time.perf_counter()
    world = build_world(config, seed, preset)
    words = pa.array([t for v in world.vocab for t in v] + world.generic_tokens)
    extra = {"simulator": {"preset": preset, "seed": seed, "truth": "truth"}}
    n_blocks = math.ceil(config.n_users / config.users_per_block)
    with DatasetWriter(Path(out), source="simulate", force=force, extra=extra) as writer:
        writer.write("users", users_table(world))
        writer.write("items", items_table(world, np.random.default_rng([seed, 2])))
        writer.add_id_map("user", _ids("u", world.n_users))
        writer.add_id_map("item", _ids("v", world.n_items))
        writer.add_id_map("channel", _ids("c", len(world.channels["primary_topic"])))
        world.save(writer.subdir("truth"))
        n_req = 0
        n_watch = 0
        bar = progress_bar(
            None,
            enabled=progress,
            fields="blocks · {task.fields[watches]:,} watches · {task.fields[rate]}",
        )
        with bar:
            task = bar.add_task("simulate", total=n_blocks, watches=0, rate="")
            for b, lo, hi in _blocks(config.n_users, config.users_per_block):
                rng = np.random.default_rng([seed, 1, b])
                ev = _BlockSimulator(world, config, rng).run(lo, hi)
                wt: _Watches = ev["watches"]
                writer.write(
                    "watches",
                    pa.table(
                        {
                            "user_id": wt.user + 1,
                            "item_id": wt.item + 1,
                            "ts": wt.ts,
                            "watch_time_s": wt.watch_time,
                            "source": pa.DictionaryArray.from_arrays(
                                pa.array(wt.source), pa.array(SOURCES)
                            ).cast(pa.string()),
                        }
                    ),
                )
                s = ev["searches"]
                writer.write(
                    "searches",
                    pa.table(
                        {
                            "user_id": s["user"] + 1,
                            "ts": s["ts"],
                            "query": _join_tokens(words, s["tokens"]),
                        }
                    ),
                )
                im = ev["impressions"]
                writer.write(
                    "impressions",
                    pa.table(
                        {
                            "request_id": im["req"] + n_req + 1,
                            "user_id": im["user"] + 1,
                            "item_id": im["item"] + 1,
                            "ts": im["ts"],
                            "position": im["position"].astype(np.int32),
                            "clicked": im["clicked"],
                            "watch_time_s": im["watch_time"],
                        }
                    ),
                )
                n_req += im["n_requests"]
                n_watch += wt.user.size
                rate = n_watch / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, watches=n_watch, rate=f"{rate:,.0f}/s")
    counts = dict(writer.manifest.row_counts)
    return SimResult(path=Path(out), counts=counts, seconds=time.perf_counter() - t0)
