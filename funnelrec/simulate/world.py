"""`build_world`: the latent world of a seed (topics, channels, items, users)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
from numpy.typing import NDArray

from funnelrec.simulate.config import SimConfig
from funnelrec.simulate.truth import DAY_S, World, order_by

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
    # The users' mechanisms draw from their own streams, and only when on, so turning them
    # off leaves every other draw (and the world) as it was without them.
    dynamics: dict[str, NDArray[Any]] = {}
    if c.focus_sd > 0:
        focus = _focus(c, seed, activity)
        _sharpen(interest, np.exp(c.focus_sd * focus))
        dynamics["focus"] = focus.astype(np.float32)
    if c.niche_rate > 0:
        tenure = np.random.default_rng([seed, 3, 1]).exponential(c.tenure_mean_days, n_users)
        dynamics["tenure_days"] = tenure.astype(np.float32)

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
            **dynamics,
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


def _focus(c: SimConfig, seed: int, activity: NDArray[np.float32]) -> F64:
    """[U] each user's focus ~ N(0, 1), correlated activity_taste_corr with log activity."""
    sig = c.activity_sigma
    z = (np.log(activity.astype(np.float64)) + 0.5 * sig * sig) / sig if sig > 0 else 0.0
    rho = c.activity_taste_corr
    noise = np.random.default_rng([seed, 3, 0]).standard_normal(activity.size)
    return rho * z + math.sqrt(1.0 - rho * rho) * noise


def _sharpen(interest: NDArray[np.float32], power: F64) -> None:
    """Raise each user's mixture to its power and renormalise, in place (chunks of users).

    A power above 1 takes weight from a user's minor topics to their main ones, below 1
    spreads it: the mixture keeps its order of topics and only its concentration moves.
    """
    chunk = 1 << 16
    for lo in range(0, interest.shape[0], chunk):
        s = slice(lo, lo + chunk)
        x = interest[s].astype(np.float64) ** power[s, None]
        interest[s] = x / x.sum(axis=1, keepdims=True)


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
