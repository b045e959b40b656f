"""`SimConfig`, everything that shapes a simulated world, its checks and the presets."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from funnelrec.config import apply_overrides
from funnelrec.errors import FunnelrecError
from funnelrec.simulate.truth import UserModel


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
    # Users who differ and change (docs/simulator.md, "Users who change"); all off at 0,
    # on in the "-v2" presets. Focus: a latent f ~ N(0, 1) per user, correlated
    # activity_taste_corr with log activity; the topic mixture is raised to the power
    # exp(focus_sd x f) and renormalised (focused users keep to fewer topics), and the
    # logit of related_next_episode moves by focus_sd x f (they binge series).
    focus_sd: float = 0.0
    activity_taste_corr: float = 0.0
    # Drift: each day the logits of a user's topic mixture take a N(0, drift_sd^2) step.
    drift_sd: float = 0.0
    # Popular to niche: within a topic a user weights items by appeal^-nu with
    # nu = niche_rate x log(1 + expected days active), counted from the user's tenure
    # before the window (exponential, mean tenure_mean_days).
    niche_rate: float = 0.0
    tenure_mean_days: float = 365.0
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
_POSITIVE = (
    "duration_median_s", "interest_concentration", "series_mean_length", "tenure_mean_days",
)  # fmt: skip
_NON_NEGATIVE = (
    "duration_topic_sigma", "duration_sigma", "appeal_sigma", "demo_effect",
    "activity_sigma", "sessions_per_day", "search_watches_mean", "related_niche",
    "focus_sd", "niche_rate",
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
    for key in _POSITIVE:
        if getattr(c, key) <= 0:
            raise bad(key, f"must be > 0, got {getattr(c, key)}")
    for key in _NON_NEGATIVE:
        if getattr(c, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(c, key)}")
    if not -1.0 <= c.activity_taste_corr <= 1.0:
        raise bad("activity_taste_corr", f"must be in [-1, 1], got {c.activity_taste_corr}")
    # A walk's spread grows with the window; at a step of 1 a month already turns almost
    # any mixture into a single topic, which is no longer drift but replacement.
    if not 0.0 <= c.drift_sd <= 1.0:
        raise bad("drift_sd", f"must be in [0, 1], got {c.drift_sd}")
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


# Each preset is sized for the use named above it; how long each takes to simulate is in
# docs/simulator.md, "Presets".
PRESETS: dict[str, SimConfig] = {
    # tests: about 20k watches
    "tiny": SimConfig(
        n_users=500, n_items=1_000, days=28, tokens_per_topic=20, items_per_channel=10
    ),
    # the demo: about 1M watches
    "small": SimConfig(n_users=20_000, n_items=10_000, days=28),
    # experiments and benchmarks: about 10M watches
    "medium": SimConfig(n_users=200_000, n_items=100_000, days=28, tokens_per_topic=120),
    # scale (one machine, bounded memory; docs/scale.md): >= 100M watches, streamed in blocks
    "large": SimConfig(n_users=1_000_000, n_items=1_000_000, days=56, tokens_per_topic=400),
}


# The "-v2" presets: the same worlds with the users' mechanisms on (docs/simulator.md,
# "Users who change", gives each strength and where it comes from). The presets without
# the suffix keep them off and give the worlds they gave before the mechanisms existed.
USER_DYNAMICS: dict[str, Any] = {
    "drift_sd": 0.1,
    "niche_rate": 0.05,
    "tenure_mean_days": 365.0,
    "focus_sd": 0.5,
    "activity_taste_corr": 0.5,
}
PRESETS.update(
    {f"{name}-v2": replace(config, **USER_DYNAMICS) for name, config in list(PRESETS.items())}
)


def preset_config(name: str, overrides: Sequence[str] = ()) -> SimConfig:
    """The config of preset `name` with `key=value` overrides applied."""
    if name not in PRESETS:
        raise FunnelrecError(f"unknown preset '{name}' (expected one of {', '.join(PRESETS)})")
    return apply_overrides(PRESETS[name], overrides)
