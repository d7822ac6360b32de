"""The user side of a request, computed when the user's profile changes rather than when
they next ask.

A split re-ranker (model/split_encoder.py) runs the user-context text through the lower
layers once per context and keeps the result (`CrossEncoderReranker._user_states`); a request
whose context is new pays that pass before its candidates: a user's first request after an
event costs about twice a returning user's (e.g. 17.8 against 8.6 ms at p50, 100k items, AMD
EPYC, docs/performance.md). And a storefront asks for recommendations right after the
events that change them: a click, then the next page. LogEvents knows the new profile
before that page does, so `UserSidePreparer` hands its context to the torch thread at once
(`prepare_users`), queued like any model call: the user's next Recommend, queued after it,
finds it kept. One model call per LogEvents batch, for the users whose context changed.

It helps a request on the replica that took the events (one replica, or routing by user);
elsewhere the request runs the pass itself, as without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from freshrec.records import UserProfile
from model.reranker import CrossEncoderReranker
from model.text import user_context_text
from services.common import metrics
from services.ranking.compute import TorchWorker

log = logging.getLogger(__name__)

MAX_USERS_PER_BATCH = 64  # a LogEvents batch of more users is a backfill, not a session


class UserSidePreparer:
    """`__call__(profiles)`: the serving re-ranker's user side for each profile's context
    (without a query: what a Recommend without one reads), on `worker`."""

    def __init__(self, worker: TorchWorker, reranker: Callable[[], CrossEncoderReranker]) -> None:
        self.worker = worker
        self.reranker = reranker

    def __call__(self, profiles: Sequence[UserProfile]) -> None:
        if not profiles or len(profiles) > MAX_USERS_PER_BATCH:
            return
        texts = [user_context_text(p) for p in profiles]
        # The version serving now: after a swap its successor computes its own on demand.
        self.worker.submit(self._prepare, self.reranker(), texts)

    @staticmethod
    def _prepare(reranker: CrossEncoderReranker, texts: list[str]) -> None:
        try:
            metrics.USER_STATES_PREPARED.inc(reranker.prepare_users(texts))
        except Exception:  # a hint: the request computes its own if this failed
            log.exception("could not prepare the user side of %d contexts", len(texts))
