"""A synthetic multi-task ranking dataset with a click -> add-to-cart -> order funnel and a controlled task correlation.

The default dataset of the demo and of the tests: it needs no download, is deterministic by seed, and exercises
every part of the data contract (user / item / context fields, a dense field, two behaviour sequences with an item
table, requests of N candidates, a user id and a timestamp).

Generative model (all vectorised numpy, one ``SeedSequence`` child stream per component so that e.g. changing the
number of requests does not change the users or the items):

* users: latent ``u ~ N(0, I_d)`` and a click propensity; observable features are noisy quantisations of the latent
  (``age_bucket``, ``gender``, ``city``) and a preferred ``device``.
* items: latent ``v = 0.8 * centre[category] + 0.6 * noise`` (so ``category`` is informative), a popularity, a
  ``brand`` whose quality drives add-to-cart / order, and a ``price``.
* task affinities follow the MMoE synthetic study (Ma et al., KDD 2018): with ``x = u * v`` (element-wise) and unit
  weight vectors ``w_t``, ``s_t = w_t . x + 0.25 * sum_j sin(alpha_j * w_t . x + beta_j)``. The click and cart vectors
  have cosine ``task_correlation``: ``w_cart = c * w_click + sqrt(1 - c^2) * w_orth``; the order vector has cosine
  ``order_correlation`` (default: the same ``c``) with the cart vector.
* labels: ``click ~ Bernoulli(sigmoid(b + 1.5 s_click + user + popularity + hour + device + noise))``; a cart needs a
  click, ``P(cart | click) = sigmoid(b' + 1.5 s_cart + quality - price + noise)``; an order needs a cart,
  ``P(order | cart) = sigmoid(b'' + 1.5 s_order + quality + noise)``. ``noise ~ N(0, label_noise^2)`` per task and
  impression. The intercepts are solved so that the base rates are ``click_rate``, ``cart_rate``, ``order_rate``
  whatever the correlation and the noise. All three labels exist on every impression (0 where the funnel stopped).
* histories: a pre-period of simulated requests with the same label model, strictly earlier than every request of
  the dataset; each user's last ``history_len`` clicked and carted items (oldest first) are the ``clicked`` and
  ``carted`` sequences of all the user's requests (leakage-free by construction).
* requests: one user, ``candidates_per_request`` distinct items drawn from a mix of popularity and uniform sampling,
  at a time following a daily activity curve; split 80/10/10 by request time (every impression of a request stays in
  one split).

List effects (all off by default, so the default data is unchanged; each is a strength >= 0, the preset ``lists``
sets all three to ``strength``). They make one candidate's engagement depend on the other candidates of its request,
the setting where request-level models (candidate-aware contextualization, list-wise losses) can matter. With
``u_i`` the click logit above (without noise) of candidate ``i`` of a request of ``N``:

* request intent (``request_intent = a``): each request has a latent intent, a category ``k`` drawn with the
  categories' catalogue shares. Retrieval favours it (candidate sampling log-weight ``+ 2.0 a`` for items of
  category ``k``) and so does the user (``u_i += 1.5 a`` for those items). The intent is never a feature: only the
  pool's composition reveals it.
* satiation (``satiation = a``): ``u_i -= 0.5 a * (number of other candidates of i's category)``: similar items in
  one pool lower each other's engagement.
* choice competition (``choice_competition = a``): the click is a choice among the shown items,
  ``click logit_i = u_i - a * log(mean_{j != i} exp(u_j))`` (a multinomial-logit-like share against the average
  competitor; ``a = 1`` is the full share): the same item is clicked less next to better alternatives.

* strongest competitor (``strongest_competitor = a``): ``click logit_i -= a * max_{j != i} u_j``: the same item is
  clicked less next to one outstanding alternative, whatever the average of the others (a page's best item draws
  the attention; ``choice_competition`` reads the average competitor).

Two effects act on the add-to-cart step (the conversion after a click), with ``q_i`` the item's quality:

* conversion competition (``conversion_competition = a``): ``cart logit_i -= a * max(0, max_{j != i, same
  category} q_j - q_i)``: a clicked item converts less when a better item of its category is on the same page.
* brand repeat (``brand_repeat = a``): ``cart logit_i -= a * (number of other candidates of i's brand)``: a brand
  (advertiser) shown twice on a page converts less on each.

Session excitation (``session_excitation = a``, off by default; the HEROES benchmarks, docs/heroes.md): a request is
shown in its candidate order (the retrieval score's), and engagement on earlier candidates raises later clicks, a
Hawkes-like self-excitation along the list: ``click logit_j += a * sum_{i < j} EXCITATION_DECAY^(j-1-i) click_i``
(the clicks actually drawn, so clicks are drawn position by position). A model that reads a request's earlier
impressions can learn it; one that scores each impression alone cannot.

The click intercept is solved after the list terms (with the excitation, by bisection over the sequential draw; the
cart intercept after the conversion terms), so the base rates hold at every strength. Cart and order are conditional
on the click (the funnel), so the click effects reach them too. The preset ``lists`` sets the first three list
effects, ``pages`` all six. ``Simulation.probability`` holds the generator's own probability of each label (the
per-impression noise integrated out, probit approximation): the **oracle** whose test AUC every table prints as the
ceiling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from onerank.data.dataset import EncodedDataset, RawDataset, RawSplit, load_or_build
from onerank.data.encoding import RaggedHistory
from onerank.data.schema import CategoricalField, DenseField, Schema, SchemaError, SequenceField, TaskSpec

GENERATOR_VERSION = "synthetic-v2"  # v2: list effects and the oracle (default data identical to v1)
TASKS = ("click", "cart", "order")
SEQUENCES = ("clicked", "carted")

BASE_TIME = 1_649_980_800  # 2022-04-15 00:00:00 UTC: times are seconds, aligned to midnight so hour = time // 3600 % 24
DAY = 86_400
AFFINITY_SCALE = 1.5  # weight of the task affinity in each logit
SIN_TERMS = 2  # number of MMoE-style sinusoidal terms in the affinities
SIN_AMPLITUDE = 0.25  # their amplitude: a mild non-linearity on top of the linear task affinity
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-54", "55+")
DEVICES = ("android", "ios", "web")
DEVICE_EFFECT = np.array([0.0, 0.1, -0.25])  # click-propensity shift per device
NUM_CITIES = 30
CITY_TIERS = 3
# Relative request volume per hour of day (more in the evening); the click propensity shifts with the same curve.
HOUR_WEIGHTS = np.array(
    [3, 2, 1, 1, 1, 1, 2, 4, 6, 6, 6, 6, 7, 6, 6, 6, 6, 7, 8, 10, 12, 12, 10, 6], dtype=np.float64
)
# List effects at strength 1 (see the module docstring): the units that the strength options multiply.
INTENT_RETRIEVAL = 2.0  # candidate-sampling log-weight boost of the request's intent category
INTENT_ENGAGEMENT = 1.5  # click-logit boost of the intent category's items
SATIATION_PENALTY = 0.5  # click-logit penalty per other candidate of the same category
CLICK_EFFECTS = ("request_intent", "satiation", "choice_competition", "strongest_competitor")
CONVERSION_EFFECTS = ("conversion_competition", "brand_repeat")
LIST_EFFECTS = CLICK_EFFECTS + CONVERSION_EFFECTS
# preset name -> the effects it sets to `strength`
PRESETS = {"lists": ("request_intent", "satiation", "choice_competition"), "pages": LIST_EFFECTS}
EXCITATION_DECAY = 0.7  # per position: a click's excitation of the next candidate, x0.7 for each one after


@dataclass
class SyntheticConfig:
    """Every option of the generator; all of them are part of the cache key."""

    num_users: int = 2000
    num_items: int = 1000
    latent_dim: int = 8
    requests_per_user: float = 1.75  # mean; each user has 1 + Poisson(requests_per_user - 1) requests
    candidates_per_request: int = 20
    history_len: int = 30  # max length of each behaviour sequence
    history_requests: float = 6.0  # mean number of pre-period requests per user (Poisson; 0 = cold-start user)
    task_correlation: float = 0.8  # cosine between the click and cart task vectors, in [-1, 1]
    order_correlation: float | None = None  # cosine between the cart and order task vectors; None: task_correlation
    label_noise: float = 0.5  # std of the gaussian noise added to every logit
    click_rate: float = 0.2  # target base rates (over all impressions)
    cart_rate: float = 0.05
    order_rate: float = 0.02
    num_categories: int = 20
    num_brands: int = 50
    popular_fraction: float = 0.5  # share of candidate sampling that follows item popularity (rest: uniform)
    days: int = 7  # length of the request period
    history_days: int = 14  # length of the pre-period that produces the histories
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    # list effects (module docstring), strengths >= 0; 0 = off
    request_intent: float = 0.0
    satiation: float = 0.0
    choice_competition: float = 0.0
    strongest_competitor: float = 0.0
    conversion_competition: float = 0.0
    brand_repeat: float = 0.0
    session_excitation: float = 0.0  # earlier clicks of a request raise later clicks (module docstring); 0 = off
    # "lists": the first three list effects at `strength`; "pages": all six (the effects it sets must then stay 0)
    preset: str | None = None
    strength: float = 1.0  # the preset's strength

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))
        self.validate()

    @classmethod
    def from_options(cls, options: dict) -> "SyntheticConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SchemaError(f"synthetic dataset: unknown options {unknown}; valid options are {sorted(known)}")
        return cls(**options)

    @property
    def list_effects(self) -> dict[str, float]:
        """The strength of each list effect, after the preset."""
        from_preset = PRESETS.get(self.preset, ())
        return {name: float(self.strength if name in from_preset else getattr(self, name)) for name in LIST_EFFECTS}

    @property
    def correlations(self) -> tuple[float, float]:
        c = float(self.task_correlation)
        return c, float(c if self.order_correlation is None else self.order_correlation)

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise SchemaError(f"synthetic dataset: {msg}")

        for name in ("num_users", "num_items", "candidates_per_request", "history_len", "num_categories",
                     "num_brands", "days", "history_days"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.latent_dim < 3:
            fail(f"latent_dim must be >= 3 (three task vectors are built from orthogonal directions), got {self.latent_dim}")
        if self.candidates_per_request > self.num_items:
            fail(f"candidates_per_request ({self.candidates_per_request}) exceeds num_items ({self.num_items})")
        if self.requests_per_user < 1:
            fail(f"requests_per_user must be >= 1 (every user has at least one request), got {self.requests_per_user}")
        if self.history_requests < 0:
            fail(f"history_requests must be >= 0, got {self.history_requests}")
        for name, value in (("task_correlation", self.task_correlation), ("order_correlation", self.order_correlation)):
            if value is not None and not -1.0 <= value <= 1.0:
                fail(f"{name} must lie in [-1, 1], got {value}")
        if self.label_noise < 0:
            fail(f"label_noise must be >= 0, got {self.label_noise}")
        if not 0 < self.order_rate < self.cart_rate < self.click_rate < 1:
            fail(
                "base rates must satisfy 0 < order_rate < cart_rate < click_rate < 1, got "
                f"{self.click_rate}, {self.cart_rate}, {self.order_rate}"
            )
        if not 0 <= self.popular_fraction <= 1:
            fail(f"popular_fraction must lie in [0, 1], got {self.popular_fraction}")
        for name in LIST_EFFECTS + ("strength", "session_excitation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(f"{name} must be a finite number >= 0, got {value!r}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                fail(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
            clash = [name for name in PRESETS[self.preset] if getattr(self, name)]
            if clash:
                fail(f"preset {self.preset!r} sets {clash} from `strength`: give either the preset or those options")
        if self.valid_fraction < 0 or self.test_fraction < 0 or self.valid_fraction + self.test_fraction >= 1:
            fail(f"valid_fraction + test_fraction must lie in [0, 1), got {self.valid_fraction} + {self.test_fraction}")


def synthetic_schema(config: SyntheticConfig | None = None) -> Schema:
    config = config or SyntheticConfig()
    return Schema(
        categorical=[
            CategoricalField("user_id", group="user"),
            CategoricalField("age_bucket", group="user"),
            CategoricalField("gender", group="user"),
            CategoricalField("city", group="user"),
            CategoricalField("item_id", group="item"),
            CategoricalField("category", group="item"),
            CategoricalField("brand", group="item"),
            CategoricalField("hour", group="context"),
            CategoricalField("device", group="context"),
        ],
        dense=[DenseField("price", group="item", log1p=True)],
        sequences=[SequenceField(name, max_len=config.history_len) for name in SEQUENCES],
        tasks=[TaskSpec(name) for name in TASKS],
        item_id="item_id",
        user_id="user_id",
        timestamp="time",
        request_id="request_id",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Simulation:
    """Everything the generator drew. ``impressions`` holds the request period (all splits, request-contiguous, in
    request-time order) with a ``split`` column; ``affinity`` the task affinities ``s_t`` of those rows;
    ``histories`` one ragged history per behaviour type with one row per user (row = user id). For the same rows:
    ``probability`` the true probability of each label (the oracle), ``click_utility`` the click logit before the
    list effects and without noise (what a model blind to the other candidates could at best know), ``intent`` the
    request's latent intent category."""

    config: SyntheticConfig
    impressions: pd.DataFrame
    pre_impressions: pd.DataFrame
    affinity: dict[str, np.ndarray]
    histories: dict[str, RaggedHistory]
    item_table: pd.DataFrame
    task_vectors: dict[str, np.ndarray]
    intercepts: dict[str, float] = field(default_factory=dict)
    probability: dict[str, np.ndarray] = field(default_factory=dict)
    click_utility: np.ndarray | None = None
    intent: np.ndarray | None = None


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_intercept(logits: np.ndarray, target: float) -> float:
    """b such that mean(sigmoid(b + logits)) == target (bisection; the mean is increasing in b)."""
    if len(logits) == 0:
        return math.log(target / (1 - target))
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + logits).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _task_vectors(rng: np.random.Generator, d: int, c: float, c_order: float) -> dict[str, np.ndarray]:
    basis, _ = np.linalg.qr(rng.standard_normal((d, 3)))  # orthonormal columns e1, e2, e3
    e1, e2, e3 = basis.T
    w_click = e1
    w_cart = c * e1 + math.sqrt(max(0.0, 1.0 - c * c)) * e2
    w_order = c_order * w_cart + math.sqrt(max(0.0, 1.0 - c_order * c_order)) * e3  # e3 is orthogonal to w_cart
    return {"click": w_click, "cart": w_cart, "order": w_order}


def _sample_candidates(
    rng: np.random.Generator, num_requests: int, k: int, log_weights: np.ndarray, chunk_cells: int = 4_000_000,
    boost: float = 0.0, intent: np.ndarray | None = None, item_category: np.ndarray | None = None,
) -> np.ndarray:
    """[num_requests, k] distinct items per request, without replacement, item i drawn with weight exp(log_weights[i])
    (Gumbel top-k), in row chunks so memory stays bounded for large catalogues. With ``boost``, items whose
    ``item_category`` is the request's ``intent`` have their log-weight raised by ``boost``."""
    n_items = len(log_weights)
    out = np.empty((num_requests, k), dtype=np.int64)
    rows_per_chunk = max(1, chunk_cells // n_items)
    for start in range(0, num_requests, rows_per_chunk):
        stop = min(num_requests, start + rows_per_chunk)
        keys = log_weights[None, :] + rng.gumbel(size=(stop - start, n_items))
        if boost:
            keys += boost * (item_category[None, :] == intent[start:stop, None])
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        # order the candidates of a request by key (a "retrieval score"), so the candidate order is meaningful
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        out[start:stop] = np.take_along_axis(top, order, axis=1)
    return out


def list_effect_logits(
    utility: np.ndarray, category: np.ndarray, intent_match: np.ndarray, effects: dict[str, float]
) -> np.ndarray:
    """The click logits of requests after the list effects (module docstring). All arrays are [requests, N]:
    ``utility`` the candidates' click logits without list effects, ``category`` their categories, ``intent_match``
    whether each is of its request's intent category; ``effects`` the strengths of ``LIST_EFFECTS``."""
    logits = utility.astype(np.float64, copy=True)
    if effects.get("request_intent"):
        logits += INTENT_ENGAGEMENT * effects["request_intent"] * intent_match
    if effects.get("satiation"):
        same_category = (category[:, :, None] == category[:, None, :]).sum(axis=2) - 1
        logits -= SATIATION_PENALTY * effects["satiation"] * same_category
    n = logits.shape[1]
    if effects.get("choice_competition") and n > 1:
        top = logits.max(axis=1, keepdims=True)
        shares = np.exp(logits - top)
        others = np.maximum(shares.sum(axis=1, keepdims=True) - shares, np.finfo(np.float64).tiny)
        competitors = np.log(others) + top - math.log(n - 1)  # log of the mean exp-utility of the other candidates
        logits -= effects["choice_competition"] * competitors
    if effects.get("strongest_competitor") and n > 1:
        # the best other candidate: the request's best, or its second best for the best one itself (ties included)
        second, best = np.sort(utility, axis=1)[:, -2:].T
        best_other = np.where(utility == best[:, None], second[:, None], best[:, None])
        logits -= effects["strongest_competitor"] * best_other
    return logits


def _best_of_others(values: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """[R, N]: for each candidate, the largest value among the *other* candidates of its request whose ``eligible``
    [R, N, N] entry (reader, other) is set; -inf where none is."""
    n = values.shape[1]
    others = np.where(eligible & ~np.eye(n, dtype=bool), values[:, None, :], -np.inf)
    return others.max(axis=2)


def conversion_effect_logits(
    quality: np.ndarray, category: np.ndarray, brand: np.ndarray, effects: dict[str, float]
) -> np.ndarray:
    """The shift of the add-to-cart logits of requests by the page's conversion effects (module docstring); all
    arrays [requests, N]."""
    shift = np.zeros(quality.shape, dtype=np.float64)
    if effects.get("conversion_competition") and quality.shape[1] > 1:
        same_category = category[:, :, None] == category[:, None, :]
        better = _best_of_others(quality.astype(np.float64), same_category) - quality
        shift -= effects["conversion_competition"] * np.maximum(better, 0.0)  # -inf (no other of its kind) -> 0
    if effects.get("brand_repeat"):
        shift -= effects["brand_repeat"] * ((brand[:, :, None] == brand[:, None, :]).sum(axis=2) - 1)
    return shift


def excited_clicks(
    logits: np.ndarray, uniform: np.ndarray, strength: float, target_rate: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Clicks drawn position by position under the session excitation (module docstring). ``logits`` and
    ``uniform`` are [requests, N] in display order. Returns (clicks, excitation of each impression by the clicks
    before it, intercept): the intercept is found by bisection so that the mean click probability is
    ``target_rate`` (it rises with the intercept: more clicks, more excitation)."""

    def draw(b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        clicks = np.zeros(logits.shape, dtype=bool)
        excitation = np.zeros(logits.shape)
        level = np.zeros(logits.shape[0])
        for j in range(logits.shape[1]):
            excitation[:, j] = level
            p = _sigmoid(b + logits[:, j] + strength * level)
            clicks[:, j] = uniform[:, j] < p
            level = EXCITATION_DECAY * level + clicks[:, j]
        return clicks, excitation, _sigmoid(b + logits + strength * excitation)

    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if draw(mid)[2].mean() < target_rate:
            lo = mid
        else:
            hi = mid
    b = 0.5 * (lo + hi)
    clicks, excitation, _ = draw(b)
    return clicks, excitation, b


def _expected_sigmoid(logits: np.ndarray, noise_std: float) -> np.ndarray:
    """E[sigmoid(x + eps)], eps ~ N(0, noise_std^2), by the probit approximation (MacKay 1992)."""
    return _sigmoid(logits / math.sqrt(1.0 + math.pi * noise_std**2 / 8.0))


def _request_times(rng: np.random.Generator, n: int, start: int, days: int) -> tuple[np.ndarray, np.ndarray]:
    day = rng.integers(0, days, size=n)
    hour = rng.choice(24, size=n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    second = rng.integers(0, 3600, size=n)
    return start + day * DAY + hour * 3600 + second, hour


def simulate(config: SyntheticConfig | None = None, **options) -> Simulation:
    """Draw the whole synthetic world for ``config`` (or ``SyntheticConfig(**options)``)."""
    if config is None:
        config = SyntheticConfig.from_options(options)
    elif options:
        config = dataclasses.replace(config, **options)
    U, I, d, N = config.num_users, config.num_items, config.latent_dim, config.candidates_per_request
    # The first seven streams are those of synthetic-v1 (spawn(n) starts with the children of spawn(7)), so the
    # default data is unchanged by the list-effect streams after them.
    streams = np.random.SeedSequence(config.seed).spawn(8)
    rng_user, rng_item, rng_task, rng_main, rng_pre, rng_label, rng_device, rng_intent = (
        np.random.default_rng(s) for s in streams
    )
    effects = config.list_effects

    # ---- users ---------------------------------------------------------------------------------------------------
    u = rng_user.standard_normal((U, d))
    user_bias = 0.5 * rng_user.standard_normal(U)
    age_signal = u[:, 0] + 0.6 * rng_user.standard_normal(U)
    age = np.searchsorted(np.quantile(age_signal, np.linspace(0, 1, len(AGE_BUCKETS) + 1)[1:-1]), age_signal)
    gender = np.where(u[:, 1] + 0.7 * rng_user.standard_normal(U) > 0, "f", "m")
    tier_signal = u[:, 2] + 1.0 * rng_user.standard_normal(U)
    tier = np.searchsorted(np.quantile(tier_signal, np.linspace(0, 1, CITY_TIERS + 1)[1:-1]), tier_signal)
    city = tier * (NUM_CITIES // CITY_TIERS) + rng_user.integers(0, NUM_CITIES // CITY_TIERS, size=U)
    preferred_device = rng_user.choice(len(DEVICES), size=U, p=[0.55, 0.35, 0.10])
    users = {
        "age_bucket": np.asarray(AGE_BUCKETS, dtype=object)[age],
        "gender": gender.astype(object),
        "city": np.char.add("city", city.astype(str)).astype(object),
    }

    # ---- items ---------------------------------------------------------------------------------------------------
    C, B = config.num_categories, config.num_brands
    centres = rng_item.standard_normal((C, d))
    cat_p = 1.0 / np.arange(1, C + 1) ** 0.7
    category = rng_item.choice(C, size=I, p=cat_p / cat_p.sum())
    v = 0.8 * centres[category] + 0.6 * rng_item.standard_normal((I, d))
    popularity = rng_item.standard_normal(I)
    brand = rng_item.integers(0, B, size=I)
    brand_quality = rng_item.standard_normal(B)
    quality = 0.7 * brand_quality[brand] + 0.7 * rng_item.standard_normal(I)
    log_price = 3.0 + 0.3 * quality + 0.6 * rng_item.standard_normal(I)
    price = np.round(np.exp(log_price), 2)
    price_z = (log_price - log_price.mean()) / max(log_price.std(), 1e-12)
    pop_weights = np.exp(popularity)
    sampling_p = config.popular_fraction * pop_weights / pop_weights.sum() + (1 - config.popular_fraction) / I
    log_sampling = np.log(sampling_p)
    intent_boost = INTENT_RETRIEVAL * effects["request_intent"]

    # ---- tasks ---------------------------------------------------------------------------------------------------
    c, c_order = config.correlations
    vectors = _task_vectors(rng_task, d, c, c_order)
    alphas = rng_task.uniform(1.0, 2.0, size=SIN_TERMS)
    betas = rng_task.uniform(0.0, 2 * math.pi, size=SIN_TERMS)

    # ---- requests: pre-period (histories) then the request period ------------------------------------------------
    t0 = BASE_TIME + config.history_days * DAY
    pre_counts = rng_pre.poisson(config.history_requests, size=U)
    pre_user = np.repeat(np.arange(U), pre_counts)
    pre_time, pre_hour = _request_times(rng_pre, len(pre_user), BASE_TIME, config.history_days)
    order = np.lexsort((pre_time, pre_user))
    pre_user, pre_time, pre_hour = pre_user[order], pre_time[order], pre_hour[order]
    pre_intent = rng_intent.choice(C, size=len(pre_user), p=cat_p / cat_p.sum())
    pre_items = _sample_candidates(rng_pre, len(pre_user), N, log_sampling, boost=intent_boost, intent=pre_intent,
                                   item_category=category)

    main_counts = 1 + rng_main.poisson(config.requests_per_user - 1.0, size=U)
    main_user = np.repeat(np.arange(U), main_counts)
    main_time, main_hour = _request_times(rng_main, len(main_user), t0, config.days)
    order = np.argsort(main_time, kind="stable")  # request index = rank in time
    main_user, main_time, main_hour = main_user[order], main_time[order], main_hour[order]
    main_intent = rng_intent.choice(C, size=len(main_user), p=cat_p / cat_p.sum())
    main_items = _sample_candidates(rng_main, len(main_user), N, log_sampling, boost=intent_boost, intent=main_intent,
                                    item_category=category)

    req_user = np.concatenate([pre_user, main_user])
    req_time = np.concatenate([pre_time, main_time])
    req_hour = np.concatenate([pre_hour, main_hour])
    req_intent = np.concatenate([pre_intent, main_intent])
    n_req = len(req_user)
    switch = rng_device.random(n_req) < 0.2
    req_device = np.where(switch, rng_device.integers(0, len(DEVICES), size=n_req), preferred_device[req_user])

    # ---- impressions and labels (pre-period and request period share the label model) ----------------------------
    row_user = np.repeat(req_user, N)
    row_item = np.concatenate([pre_items.ravel(), main_items.ravel()])
    row_req = np.repeat(np.arange(n_req), N)
    x = u[row_user] * v[row_item]
    affinity = {}
    for task, w in vectors.items():
        z = x @ w
        affinity[task] = z + SIN_AMPLITUDE * np.sin(alphas[None, :] * z[:, None] + betas[None, :]).sum(axis=1)
    hour_effect = 0.15 * np.cos(2 * math.pi * (req_hour - 21) / 24)
    n_rows = len(row_user)
    noise = config.label_noise * rng_label.standard_normal((3, n_rows))
    click_utility = (
        AFFINITY_SCALE * affinity["click"] + user_bias[row_user] + 0.4 * popularity[row_item]
        + hour_effect[row_req] + DEVICE_EFFECT[req_device][row_req]
    )
    click_mean = click_utility
    if any(effects[name] for name in CLICK_EFFECTS):
        click_mean = list_effect_logits(
            click_utility.reshape(n_req, N), category[row_item].reshape(n_req, N),
            (category[row_item] == req_intent[row_req]).reshape(n_req, N), effects,
        ).ravel()
    cart_mean = AFFINITY_SCALE * affinity["cart"] + 0.5 * quality[row_item] - 0.4 * price_z[row_item]
    if any(effects[name] for name in CONVERSION_EFFECTS):
        cart_mean = cart_mean + conversion_effect_logits(
            quality[row_item].reshape(n_req, N), category[row_item].reshape(n_req, N),
            brand[row_item].reshape(n_req, N), effects,
        ).ravel()
    order_mean = AFFINITY_SCALE * affinity["order"] + 0.5 * quality[row_item]
    click_logit, cart_logit, order_logit = click_mean + noise[0], cart_mean + noise[1], order_mean + noise[2]
    uniform = rng_label.random((3, n_rows))
    if config.session_excitation > 0:
        clicks, excitation, b_click = excited_clicks(
            click_logit.reshape(n_req, N), uniform[0].reshape(n_req, N), config.session_excitation, config.click_rate
        )
        click, excitation = clicks.ravel(), config.session_excitation * excitation.ravel()
        click_mean = click_mean + excitation  # the oracle below knows the clicks drawn before each impression
    else:
        b_click = _solve_intercept(click_logit, config.click_rate)
        click = uniform[0] < _sigmoid(b_click + click_logit)
    b_cart = _solve_intercept(cart_logit[click], config.cart_rate / config.click_rate)
    cart = click & (uniform[1] < _sigmoid(b_cart + cart_logit))
    b_order = _solve_intercept(order_logit[cart], config.order_rate / config.cart_rate)
    order_label = cart & (uniform[2] < _sigmoid(b_order + order_logit))
    # the oracle: each label's probability given everything drawn but the per-impression noise and coin
    p_click = _expected_sigmoid(b_click + click_mean, config.label_noise)
    p_cart = p_click * _expected_sigmoid(b_cart + cart_mean, config.label_noise)
    p_order = p_cart * _expected_sigmoid(b_order + order_mean, config.label_noise)

    # ---- histories from the pre-period ---------------------------------------------------------------------------
    n_pre_rows = len(pre_user) * N
    histories = {}
    for seq, flag in (("clicked", click), ("carted", cart)):
        events = np.flatnonzero(flag[:n_pre_rows])  # already in (user, time, candidate) order
        histories[seq] = _last_per_user(row_user[events], row_item[events], req_time[row_req[events]], U,
                                        config.history_len)

    # ---- tables --------------------------------------------------------------------------------------------------
    def table(rows: slice, req_offset: int) -> pd.DataFrame:
        ru, ri, rr = row_user[rows], row_item[rows], row_req[rows]
        return pd.DataFrame({
            "request_id": rr - req_offset,
            "time": req_time[rr],
            "user_id": ru,
            "age_bucket": users["age_bucket"][ru],
            "gender": users["gender"][ru],
            "city": users["city"][ru],
            "hour": req_hour[rr],
            "device": np.asarray(DEVICES, dtype=object)[req_device[rr]],
            "item_id": ri,
            "category": category[ri],
            "brand": brand[ri],
            "price": price[ri],
            "click": click[rows].astype(np.int8),
            "cart": cart[rows].astype(np.int8),
            "order": order_label[rows].astype(np.int8),
        })

    main_rows = slice(n_pre_rows, n_rows)
    impressions = table(main_rows, len(pre_user))
    n_main_req = len(main_user)
    n_train = int(round(n_main_req * (1 - config.valid_fraction - config.test_fraction)))
    n_valid = int(round(n_main_req * config.valid_fraction))
    req = impressions["request_id"].to_numpy()
    impressions["split"] = np.where(req < n_train, "train", np.where(req < n_train + n_valid, "valid", "test"))
    item_table = pd.DataFrame({"item_id": np.arange(I), "category": category, "brand": brand, "price": price})
    return Simulation(
        config=config,
        impressions=impressions,
        pre_impressions=table(slice(0, n_pre_rows), 0),
        affinity={t: a[main_rows] for t, a in affinity.items()},
        histories=histories,
        item_table=item_table,
        task_vectors=vectors,
        intercepts={"click": b_click, "cart": b_cart, "order": b_order},
        probability={t: p[main_rows] for t, p in zip(TASKS, (p_click, p_cart, p_order))},
        click_utility=click_utility[main_rows],
        intent=req_intent[row_req[main_rows]],
    )


def _last_per_user(user: np.ndarray, item: np.ndarray, time: np.ndarray, num_users: int, max_len: int) -> RaggedHistory:
    """Events sorted by (user, time) -> one ragged row per user with its last ``max_len`` events, oldest first."""
    counts = np.bincount(user, minlength=num_users)
    ends = np.cumsum(counts)
    keep = (ends[user] - 1 - np.arange(len(user))) < max_len
    lengths = np.minimum(counts, max_len)
    return RaggedHistory(
        values=item[keep].astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        times=time[keep].astype(np.int64),
    )


def _rows_of(history: RaggedHistory, index: np.ndarray) -> RaggedHistory:
    """The ragged rows ``index`` of ``history`` (rows may repeat), vectorised."""
    lengths = np.diff(history.offsets)[index]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    source = np.repeat(history.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return RaggedHistory(
        values=history.values[source],
        offsets=offsets,
        times=None if history.times is None else history.times[source],
    )


def oracle_metrics(sim: Simulation) -> dict[str, dict]:
    """Per split, the test metrics of the generator's own probabilities (``oracle``: the ceiling no model reaches
    but by chance) and the click AUC of the list-blind utility (``list_blind_click_auc``: the same without the list
    effects; the gap between the two is what only the other candidates can explain)."""
    from onerank.metrics.ranking import auc, task_metrics

    imp = sim.impressions
    oracle, blind = {}, {}
    for name in ("train", "valid", "test"):
        rows = (imp["split"] == name).to_numpy()
        users = pd.factorize(imp["user_id"][rows])[0]
        oracle[name] = {
            t: {k: v for k, v in task_metrics("binary", imp[t].to_numpy()[rows], sim.probability[t][rows],
                                              users).items() if k in ("auc", "gauc", "logloss")}
            for t in TASKS
        }
        blind[name] = auc(imp["click"].to_numpy()[rows], sim.click_utility[rows])
    return {"oracle": oracle, "list_blind_click_auc": blind}


def build_raw(config: SyntheticConfig | None = None, **options) -> RawDataset:
    """The synthetic world as a ``RawDataset`` (splits by request time, request-level histories)."""
    sim = simulate(config, **options)
    config = sim.config
    schema = synthetic_schema(config)
    splits = {}
    for name in ("train", "valid", "test"):
        part = sim.impressions[sim.impressions["split"] == name].drop(columns="split").reset_index(drop=True)
        users = part["user_id"].to_numpy()
        splits[name] = RawSplit(
            table=part,
            histories={seq: _rows_of(sim.histories[seq], users) for seq in SEQUENCES},
            request=part["request_id"].to_numpy(dtype=np.int64),
        )
    imp = sim.impressions
    info = {
        "generator": GENERATOR_VERSION,
        "config": dataclasses.asdict(config),
        "rows": {name: int(len(s.table)) for name, s in splits.items()},
        "requests": {name: int(s.table["request_id"].nunique()) for name, s in splits.items()},
        "base_rates": {name: {t: float(s.table[t].mean()) for t in TASKS} for name, s in splits.items()},
        "affinity_correlation": {
            "click_cart": float(np.corrcoef(sim.affinity["click"], sim.affinity["cart"])[0, 1]),
            "cart_order": float(np.corrcoef(sim.affinity["cart"], sim.affinity["order"])[0, 1]),
        },
        "conversion": {
            "cart_given_click": float(imp["cart"][imp["click"] == 1].mean()),
            "order_given_cart": float(imp["order"][imp["cart"] == 1].mean()),
        },
        "history_mean_len": {seq: float(np.diff(sim.histories[seq].offsets).mean()) for seq in SEQUENCES},
        "list_effects": config.list_effects,
        **oracle_metrics(sim),
    }
    return RawDataset(
        name="synthetic",
        schema=schema,
        item_table=sim.item_table[["item_id", "category", "brand"]],
        info=info,
        **splits,
    )


def load(data_dir: str | Path | None = None, cache_root: str | Path | None = None, **options) -> EncodedDataset:
    """Load the synthetic dataset (``data_dir`` is ignored: nothing is read from disk). ``options``: the fields of
    ``SyntheticConfig`` and ``hash_buckets`` (``load_or_build``); every one of them and the generator version are in the
    cache key."""
    hash_buckets = options.pop("hash_buckets", None)  # {field: buckets}: hashed ids instead of vocabularies
    config = SyntheticConfig.from_options(options)
    key = {"dataset": "synthetic", "generator": GENERATOR_VERSION, "config": dataclasses.asdict(config)}
    ds = load_or_build("synthetic", key, lambda: build_raw(config), cache_root, hash_buckets)
    ds.info["time_unit"] = "s"  # what a session_gap duration is converted to (data/sessions.py)
    return ds
