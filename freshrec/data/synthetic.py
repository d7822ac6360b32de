"""A seeded synthetic online shop whose tastes and catalogue drift over time.

Twelve categories, each with its own brands, vocabulary and price level, give products
readable titles and descriptions. About 65% of the catalogue exists when the period starts; the
rest launches during it and enjoys a short launch boost. Category popularity follows a smooth
seasonal wave plus a random walk, so what people look at and buy shifts from week to week.
Users have latent tastes (a Dirichlet over categories, a favourite brand per category and a
preferred price level); each session shows a few impressions, some become clicks, some of those
add_to_cart, some of those purchase. Everything is drawn from one `numpy.random.Generator`,
so a seed fixes every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from freshrec.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, Dataset
from freshrec.errors import InvalidArgument


@dataclass(frozen=True)
class _Category:
    name: str
    brands: tuple[str, ...]
    models: tuple[str, ...]
    nouns: tuple[str, ...]
    features: tuple[str, ...]
    uses: tuple[str, ...]
    price_median: float
    price_sigma: float


CATEGORIES: tuple[_Category, ...] = (
    _Category(
        "running shoes",
        ("Northpeak", "Stridewell", "Kairo", "Fleetfoot", "Ondara"),
        ("Aurora", "Tempo", "Velocity", "Summit", "Pulse", "Drift", "Comet", "Ridge"),
        ("Trail Running Shoe", "Road Running Shoe", "Racing Flat", "Stability Trainer"),
        (
            "lightweight",
            "waterproof",
            "responsive cushioning",
            "breathable mesh upper",
            "grippy rubber outsole",
            "wide toe box",
            "carbon fibre plate",
            "reflective details",
        ),
        (
            "Built for daily training runs and long weekend miles.",
            "Made for technical trails and muddy descents.",
            "Ready for race day and fast tempo sessions.",
        ),
        110.0,
        0.3,
    ),
    _Category(
        "coffee",
        ("Bean Republic", "Highland Roasters", "Cafe Lumo", "Ember & Co", "Blackwater"),
        ("Sunrise", "Andes", "Sidamo", "Midnight", "Velvet", "Harvest", "Forte", "Huila"),
        ("Whole Bean Coffee", "Ground Coffee", "Espresso Blend", "Single Origin Beans"),
        (
            "dark roast",
            "medium roast",
            "light roast",
            "notes of chocolate and cherry",
            "fair trade",
            "organic",
            "low acidity",
            "1 kg bag",
        ),
        (
            "Great for espresso machines and moka pots.",
            "Best brewed as pour-over or filter coffee.",
            "Roasted in small batches every week.",
        ),
        16.0,
        0.35,
    ),
    _Category(
        "headphones",
        ("Sonique", "Auralis", "Beatline", "Quietwave", "Tonal"),
        ("Halo", "Studio", "Pulse", "Nova", "Echo", "Zen", "Apex", "Orbit"),
        (
            "Wireless Headphones",
            "Noise Cancelling Headphones",
            "True Wireless Earbuds",
            "Studio Monitor Headphones",
        ),
        (
            "active noise cancelling",
            "30-hour battery",
            "Bluetooth 5.3",
            "foldable design",
            "USB-C fast charging",
            "built-in microphone",
            "sweat resistant",
            "hi-res audio",
        ),
        (
            "Made for commuting, flights and focused work.",
            "Tuned for the gym and outdoor runs.",
            "Designed for mixing, podcasts and critical listening.",
        ),
        120.0,
        0.6,
    ),
    _Category(
        "cookware",
        ("Ferro", "Casa Cucina", "Ironhearth", "Panora", "Chefline"),
        ("Classic", "Pro", "Heritage", "Everyday", "Artisan", "Prime", "Forge", "Bistro"),
        ("Cast Iron Skillet", "Nonstick Frying Pan", "Stainless Steel Saucepan", "Dutch Oven"),
        (
            "oven safe to 260 °C",
            "induction compatible",
            "PFAS-free nonstick coating",
            "pre-seasoned",
            "dishwasher safe",
            "stay-cool handle",
            "even heat distribution",
            "glass lid included",
        ),
        (
            "Ideal for searing steaks and weeknight stir-fries.",
            "Perfect for slow-cooked stews and fresh bread.",
            "A kitchen workhorse for eggs, sauces and pancakes.",
        ),
        55.0,
        0.5,
    ),
    _Category(
        "skincare",
        ("Lumea", "Pure Botanica", "Dermis Lab", "Velour", "Nordic Dew"),
        ("Hydra", "Glow", "Calm", "Renew", "Daily", "Clear", "Silk", "Barrier"),
        ("Face Moisturiser", "Vitamin C Serum", "Gentle Cleanser", "Mineral Sunscreen SPF 50"),
        (
            "fragrance free",
            "for sensitive skin",
            "with hyaluronic acid",
            "non-comedogenic",
            "vegan formula",
            "dermatologist tested",
            "with niacinamide",
            "50 ml",
        ),
        (
            "Use morning and evening on clean skin.",
            "Suits dry and combination skin in every season.",
            "Layers well under make-up.",
        ),
        25.0,
        0.45,
    ),
    _Category(
        "camping gear",
        ("Trailhead", "Wildmark", "Basecamp Co", "Alpenglow", "Northfold"),
        ("Ranger", "Nomad", "Horizon", "Glacier", "Canyon", "Timber", "Pioneer", "Ridge"),
        ("Two-Person Tent", "Down Sleeping Bag", "Inflatable Sleeping Pad", "Camping Stove"),
        (
            "ultralight",
            "packs small",
            "rated to -5 °C",
            "weatherproof",
            "quick setup",
            "recycled materials",
            "three-season",
            "includes carry sack",
        ),
        (
            "Made for backpacking trips and wild camping.",
            "Comfortable for family weekends at the campsite.",
            "Tested on alpine routes in wind and rain.",
        ),
        80.0,
        0.7,
    ),
    _Category(
        "board games",
        ("Meeple House", "Tabletop Forge", "Dicewise", "Gamewright Studio", "Cardboard Castle"),
        (
            "Kingdoms",
            "Starfall",
            "Harbour",
            "Lost Ruins",
            "Orchard",
            "Dragon Peak",
            "Railways",
            "Mystic Isle",
        ),
        ("Strategy Board Game", "Family Card Game", "Cooperative Adventure Game", "Party Game"),
        (
            "for 2-4 players",
            "for 3-8 players",
            "45-minute play time",
            "ages 10 and up",
            "easy to learn",
            "high replay value",
            "beautifully illustrated",
            "solo mode",
        ),
        (
            "A hit for game nights with friends.",
            "Fun for the whole family on rainy afternoons.",
            "Deep enough for seasoned strategy players.",
        ),
        35.0,
        0.35,
    ),
    _Category(
        "smartwatches",
        ("Chronix", "Fitwave", "Pulsar Tech", "Vantage", "Orbital"),
        ("Active", "Sport", "Pro", "Lite", "Edge", "Core", "Trek", "Vital"),
        ("Smartwatch", "GPS Sports Watch", "Fitness Tracker", "Hybrid Smartwatch"),
        (
            "heart rate monitor",
            "built-in GPS",
            "7-day battery",
            "water resistant to 50 m",
            "sleep tracking",
            "contactless payments",
            "AMOLED display",
            "blood oxygen sensor",
        ),
        (
            "Tracks runs, rides and swims with training insights.",
            "Keeps notifications and health stats on your wrist.",
            "Built for ultra-distance and multi-day adventures.",
        ),
        220.0,
        0.45,
    ),
    _Category(
        "backpacks",
        ("Packhaus", "Urban Nomad", "Roamwell", "Kestrel Bags", "Daytrip"),
        ("Commuter", "Metro", "Voyager", "Scout", "Atlas", "Transit", "Summit", "Rover"),
        ("Laptop Backpack", "Hiking Daypack", "Travel Backpack", "Rolltop Backpack"),
        (
            "fits 16-inch laptops",
            "water-repellent",
            "25 litres",
            "40 litres",
            "padded shoulder straps",
            "hidden anti-theft pocket",
            "recycled polyester",
            "airline carry-on size",
        ),
        (
            "Organised for the daily commute and the office.",
            "Comfortable on day hikes and city trips.",
            "Sized for one-bag travel on budget airlines.",
        ),
        70.0,
        0.4,
    ),
    _Category(
        "tea",
        ("Leaf & Kettle", "Jade Mountain", "Teahouse No. 9", "Chai Bazaar", "Morning Mist"),
        ("Imperial", "Garden", "Royal", "Spring", "Monsoon", "Emperor", "Meadow", "Himalaya"),
        ("Green Tea", "Earl Grey Black Tea", "Masala Chai", "Herbal Infusion"),
        (
            "loose leaf",
            "20 pyramid bags",
            "organic",
            "caffeine free",
            "with bergamot",
            "hand-picked",
            "100 g tin",
            "first flush",
        ),
        (
            "Steep for three minutes for a bright, smooth cup.",
            "Lovely with milk on a cold afternoon.",
            "A calming cup before bed.",
        ),
        12.0,
        0.4,
    ),
    _Category(
        "pet supplies",
        ("Happy Paws", "Furrytail", "Barkley & Co", "Whisker Works", "Petra"),
        ("Cosy", "Active", "Classic", "Comfort", "Adventure", "Snuggle", "Play", "Fresh"),
        ("Orthopedic Dog Bed", "Cat Scratching Post", "Dog Harness", "Automatic Pet Feeder"),
        (
            "machine washable",
            "for large dogs",
            "for small cats",
            "non-slip base",
            "chew resistant",
            "adjustable fit",
            "portion control timer",
            "soft memory foam",
        ),
        (
            "Keeps pets comfortable, happy and busy at home.",
            "Made for walks, car rides and adventures outdoors.",
            "Easy to clean and built to last.",
        ),
        35.0,
        0.6,
    ),
    _Category(
        "lighting",
        ("Lumina", "Brightform", "Nordlys", "Lampwerk", "Halden"),
        ("Arc", "Beam", "Nova", "Loft", "Slim", "Atelier", "Glow", "Studio"),
        ("LED Desk Lamp", "Floor Lamp", "Smart Light Bulb", "Bedside Lamp"),
        (
            "dimmable",
            "warm to cool white",
            "USB charging port",
            "app and voice control",
            "energy class A",
            "adjustable arm",
            "touch control",
            "brushed brass finish",
        ),
        (
            "Gives glare-free light for reading and home office work.",
            "Creates a warm, cosy mood in the living room.",
            "Fits small apartments and bedside tables.",
        ),
        45.0,
        0.45,
    ),
)

START = pd.Timestamp("2024-03-01", tz="UTC")
DAY_S = 86_400.0
EXISTING_SHARE = 0.65  # share of the catalogue already on sale when the period starts
LAUNCH_BOOST = 4.0  # extra exposure weight of a brand-new product ...
LAUNCH_DECAY_DAYS = 6.0  # ... fading with this time constant
OUT_OF_STOCK_SHARE = 0.05
IMPRESSIONS_PER_SESSION = (3, 8)  # inclusive range
# Mean events (impressions + clicks + carts + purchases) a session yields at the rates below;
# measured, and used to turn events_per_user into a number of sessions.
EVENTS_PER_SESSION = 7.2


def generate_shop(
    seed: int = 7,
    n_items: int = 2000,
    n_users: int = 500,
    days: int = 60,
    events_per_user: float = 60.0,
) -> Dataset:
    """Generate a synthetic shop's catalogue and a drifting event stream.

    Args:
        seed: fixes every random draw; equal seeds give equal frames.
        n_items: products in the catalogue, >= 1.
        n_users: shoppers, >= 1.
        days: length of the event period in days, >= 1.
        events_per_user: mean events (all types) per user over the period, > 0.

    Returns:
        Dataset `synthetic` with canonical columns, interactions sorted by timestamp, unique
        event ids, and every event at or after its item's created_at.

    Raises:
        InvalidArgument: a size argument is out of range.
    """
    _check_range("n_items", n_items, 1)
    _check_range("n_users", n_users, 1)
    _check_range("days", days, 1)
    if not events_per_user > 0:
        raise InvalidArgument(f"events_per_user must be > 0, got {events_per_user}")

    rng = np.random.default_rng(seed)
    catalogue = _make_catalogue(rng, n_items, days)
    users = _make_users(rng, n_users)
    log_trend = _category_trends(rng, days)
    events = _simulate_events(rng, catalogue, users, log_trend, days, events_per_user, seed)

    items = catalogue.frame[list(ITEM_COLUMNS)].reset_index(drop=True)
    notes = {
        "seed": str(seed),
        "start": START.isoformat(),
        "days": str(days),
        "drift": "seasonal + random-walk category popularity; new products get a launch boost",
    }
    return Dataset(name="synthetic", items=items, interactions=events, notes=notes)


def generate_catalogue(seed: int = 7, n_items: int = 2000, days: int = 60) -> pd.DataFrame:
    """The catalogue `generate_shop` makes with the same arguments, without simulating events
    (catalogue-scale benchmarks: `freshrec bench recall`).

    Raises:
        InvalidArgument: a size argument is out of range.
    """
    _check_range("n_items", n_items, 1)
    _check_range("days", days, 1)
    catalogue = _make_catalogue(np.random.default_rng(seed), n_items, days)
    return catalogue.frame[list(ITEM_COLUMNS)].reset_index(drop=True)


def _check_range(name: str, value: int, low: int) -> None:
    if int(value) != value or value < low:
        raise InvalidArgument(f"{name} must be an integer >= {low}, got {value}")


@dataclass(frozen=True)
class _Catalogue:
    frame: pd.DataFrame
    category: np.ndarray  # category index per item
    brand: np.ndarray  # brand index within the item's category
    quality: np.ndarray  # latent appeal, log scale
    price_z: np.ndarray  # log price relative to the category, in category sigmas
    created_s: np.ndarray  # seconds from START (negative: on sale before the period)


@dataclass(frozen=True)
class _Users:
    ids: np.ndarray
    taste: np.ndarray  # (users, categories), rows sum to 1
    favourite_brand: np.ndarray  # (users, categories) brand index
    brand_loyalty: np.ndarray  # how much the favourite brand counts
    price_level: np.ndarray  # preferred price, in category sigmas
    activity: np.ndarray  # relative number of sessions, mean 1


def _make_catalogue(rng: np.random.Generator, n_items: int, days: int) -> _Catalogue:
    n_cat = len(CATEGORIES)
    category = rng.permutation(np.arange(n_items) % n_cat)
    brand = rng.integers(0, 5, n_items)
    model = rng.integers(0, 8, n_items)
    noun = rng.integers(0, 4, n_items)
    use = rng.integers(0, 3, n_items)
    features = np.argsort(rng.random((n_items, 8)), axis=1)[:, :3]
    price_z = rng.standard_normal(n_items)
    quality = rng.normal(0.0, 0.6, n_items)
    launches = rng.random(n_items) >= EXISTING_SHARE
    created_days = np.where(
        launches, rng.uniform(0.0, days, n_items), -rng.uniform(1.0, 365.0, n_items)
    )
    in_stock = rng.random(n_items) >= OUT_OF_STOCK_SHARE

    titles, descriptions, brands, prices, names = [], [], [], [], []
    for i in range(n_items):
        cat = CATEGORIES[category[i]]
        b, m, n = cat.brands[brand[i]], cat.models[model[i]], cat.nouns[noun[i]]
        f1, f2, f3 = (cat.features[j] for j in features[i])
        titles.append(f"{b} {m} {n} — {f1}, {f2}")
        descriptions.append(f"{b} {m} {n}: {f1}, {f2} and {f3}. {cat.uses[use[i]]}")
        brands.append(b)
        names.append(cat.name)
        price = cat.price_median * np.exp(cat.price_sigma * price_z[i])
        prices.append(max(round(price) - 0.01, 0.99))

    created_s = np.round(created_days * DAY_S)
    frame = pd.DataFrame(
        {
            "item_id": [f"sku-{i:05d}" for i in range(n_items)],
            "title": titles,
            "description": descriptions,
            "category": names,
            "brand": brands,
            "price": np.asarray(prices, dtype=np.float64),
            "created_at": _to_utc(created_s),
            "in_stock": in_stock,
        }
    )
    return _Catalogue(frame, category, brand, quality, price_z, created_s)


def _make_users(rng: np.random.Generator, n_users: int) -> _Users:
    n_cat = len(CATEGORIES)
    activity = rng.lognormal(0.0, 0.5, n_users)
    return _Users(
        ids=np.array([f"user-{u:04d}" for u in range(n_users)], dtype=object),
        taste=rng.dirichlet(np.full(n_cat, 0.35), n_users),
        favourite_brand=rng.integers(0, 5, (n_users, n_cat)),
        brand_loyalty=rng.uniform(0.0, 1.5, n_users),
        price_level=rng.normal(0.0, 0.7, n_users),
        activity=activity / activity.mean(),
    )


def _category_trends(rng: np.random.Generator, days: int) -> np.ndarray:
    """Log popularity multiplier per (day, category): a seasonal wave plus a random walk."""
    n_cat = len(CATEGORIES)
    t = np.arange(days + 1)[:, None]
    period = rng.uniform(20.0, 60.0, n_cat)
    phase = rng.uniform(0.0, 2 * np.pi, n_cat)
    amplitude = rng.uniform(0.3, 0.9, n_cat)
    walk = np.cumsum(rng.normal(0.0, 0.08, (days + 1, n_cat)), axis=0)
    return amplitude * np.sin(2 * np.pi * t / period + phase) + walk


def _simulate_events(
    rng: np.random.Generator,
    cat: _Catalogue,
    users: _Users,
    log_trend: np.ndarray,
    days: int,
    events_per_user: float,
    seed: int,
) -> pd.DataFrame:
    n_cat = len(CATEGORIES)
    horizon = days * DAY_S
    sessions = rng.poisson(events_per_user * users.activity / EVENTS_PER_SESSION)
    sess_user = np.repeat(np.arange(len(users.ids)), sessions)
    sess_t = rng.uniform(0.0, horizon, len(sess_user))
    sess_day = np.minimum((sess_t // DAY_S).astype(np.int64), days)

    # A session browses one category, chosen by taste x today's trend among categories that
    # already have at least one product on sale.
    by_cat = [np.flatnonzero(cat.category == c) for c in range(n_cat)]
    first_launch = np.array([cat.created_s[idx].min() if len(idx) else np.inf for idx in by_cat])
    weight = users.taste[sess_user] * np.exp(log_trend[sess_day])
    weight *= first_launch[None, :] <= sess_t[:, None]
    total = weight.sum(axis=1)
    live = total > 0
    sess_user, sess_t, weight, total = sess_user[live], sess_t[live], weight[live], total[live]
    cum = np.cumsum(weight, axis=1) / total[:, None]
    sess_cat = np.minimum((cum < rng.random(len(sess_t))[:, None]).sum(axis=1), n_cat - 1)
    n_shown = rng.integers(IMPRESSIONS_PER_SESSION[0], IMPRESSIONS_PER_SESSION[1] + 1, len(sess_t))

    imp_sess: list[np.ndarray] = []
    imp_item: list[np.ndarray] = []
    imp_pos: list[np.ndarray] = []
    for c in range(n_cat):
        s_idx = np.flatnonzero(sess_cat == c)
        items = by_cat[c]
        if len(s_idx) == 0 or len(items) == 0:
            continue
        u = sess_user[s_idx]
        age_days = (sess_t[s_idx, None] - cat.created_s[None, items]) / DAY_S
        exists = age_days >= 0
        boost = np.log1p(LAUNCH_BOOST * np.exp(-np.clip(age_days, 0.0, None) / LAUNCH_DECAY_DAYS))
        personal = _affinity(users, cat, u[:, None], items[None, :])
        logits = cat.quality[None, items] + boost + 0.5 * personal
        # Gumbel top-k: k draws without replacement, proportional to exp(logits).
        keys = np.where(exists, logits + rng.gumbel(size=logits.shape), -np.inf)
        k = min(IMPRESSIONS_PER_SESSION[1], len(items))
        # Partition first: a full sort of every row costs far more at large catalogues.
        if k < len(items):
            top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(k), keys.shape)
        rank = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, rank, axis=1)
        top_keys = np.take_along_axis(keys, top, axis=1)
        pos = np.broadcast_to(np.arange(k), top.shape)
        keep = np.isfinite(top_keys) & (pos < n_shown[s_idx, None])
        rows = np.broadcast_to(s_idx[:, None], top.shape)
        imp_sess.append(rows[keep])
        imp_item.append(items[top[keep]])
        imp_pos.append(pos[keep])

    if not imp_sess:
        return _empty_interactions()
    i_sess = np.concatenate(imp_sess)
    i_item = np.concatenate(imp_item)
    i_pos = np.concatenate(imp_pos)
    order = np.lexsort((i_pos, i_sess))
    i_sess, i_item, i_pos = i_sess[order], i_item[order], i_pos[order]
    i_user = sess_user[i_sess]

    affinity = _affinity(users, cat, i_user, i_item)
    category_pull = np.log(users.taste[i_user, cat.category[i_item]] * n_cat + 1e-3)
    p_click = _sigmoid(-1.6 + cat.quality[i_item] + affinity + 0.3 * category_pull - 0.1 * i_pos)
    clicked = rng.random(len(i_item)) < p_click
    p_cart = _sigmoid(-0.9 + affinity + 0.5 * cat.quality[i_item])
    carted = clicked & (rng.random(len(i_item)) < p_cart)
    price_fit = -0.5 * (cat.price_z[i_item] - users.price_level[i_user]) ** 2
    p_buy = _sigmoid(0.4 + price_fit)
    bought = carted & (rng.random(len(i_item)) < p_buy)

    t_imp = sess_t[i_sess] + i_pos * 6.0 + rng.uniform(0.0, 4.0, len(i_item))
    t_click = t_imp + 1.0 + rng.exponential(20.0, len(i_item))
    t_cart = t_click + 5.0 + rng.exponential(60.0, len(i_item))
    t_buy = t_cart + 10.0 + rng.exponential(180.0, len(i_item))

    stages = (
        ("impression", np.ones(len(i_item), dtype=bool), t_imp),
        ("click", clicked, t_click),
        ("add_to_cart", carted, t_cart),
        ("purchase", bought, t_buy),
    )
    ev_item = np.concatenate([i_item[m] for _, m, _ in stages])
    ev_user = np.concatenate([i_user[m] for _, m, _ in stages])
    ev_type = np.concatenate([np.full(int(m.sum()), name, dtype=object) for name, m, _ in stages])
    ev_stage = np.concatenate([np.full(int(m.sum()), k) for k, (_, m, _) in enumerate(stages)])
    # Millisecond resolution; events near the end are kept inside the period.
    ev_t = np.concatenate([t[m] for _, m, t in stages])
    ev_t = np.minimum(np.round(ev_t * 1000.0), horizon * 1000.0 - 1.0) / 1000.0
    order = np.lexsort((ev_stage, ev_t))

    n = len(order)
    width = max(7, len(str(n)))
    serial = np.char.zfill(np.arange(n).astype(str), width)
    frame = pd.DataFrame(
        {
            "event_id": np.char.add(f"syn{seed}-", serial).astype(object),
            "user_id": users.ids[ev_user[order]],
            "item_id": cat.frame["item_id"].to_numpy()[ev_item[order]],
            "event_type": ev_type[order],
            "timestamp": _to_utc(ev_t[order]),
        }
    )
    return frame[list(INTERACTION_COLUMNS)]


def _affinity(users: _Users, cat: _Catalogue, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """How much a user likes an item beyond its general appeal (broadcasts user x item)."""
    favourite = users.favourite_brand[user, cat.category[item]] == cat.brand[item]
    price_fit = -0.5 * (cat.price_z[item] - users.price_level[user]) ** 2
    return users.brand_loyalty[user] * favourite + price_fit


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _to_utc(seconds_from_start: np.ndarray) -> pd.DatetimeIndex:
    nanos = np.round(np.asarray(seconds_from_start, dtype=np.float64) * 1e9).astype(np.int64)
    return pd.DatetimeIndex(
        pd.to_datetime(START.value + nanos, utc=True), dtype="datetime64[ns, UTC]"
    )


def _empty_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": pd.Series([], dtype=object),
            "user_id": pd.Series([], dtype=object),
            "item_id": pd.Series([], dtype=object),
            "event_type": pd.Series([], dtype=object),
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
        }
    )
