"""The user side of a request, computed when the user's profile changes rather than when
they next ask.

A split re-ranker (model/split_encoder.py) runs the user-context text through the lower
layers once per context and keeps the result (`CrossEncoderReranker._user_states`); a request
whose context is new pays that pass before its candidates: about twice a returning user's
request at 100k items (docs/performance.md, "The user side prepared after LogEvents"). And a
storefront asks for recommendations right after the events that change them: a click, then
the next page. LogEvents knows the new profile before that page does, so `UserSidePreparer`
queues its context for the torch thread at once (`prepare_users`): the user's next Recommend,
queued after it, finds it kept.

The contexts wait in a queue of their own and go to the torch thread a few at a time
(`CHUNK`), each chunk queued behind the model calls already waiting: a LogEvents batch of many
users (an event forwarder's) never holds requests back for more than one chunk's pass. It
helps a request on the replica that took the events (one replica, or routing by user);
elsewhere the request runs the pass itself, as without it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from freshrec.records import UserProfile
from model.reranker import CrossEncoderReranker
from model.text import user_context_text
from services.common import metrics
from services.ranking.compute import TorchWorker

log = logging.getLogger(__name__)

CHUNK = 8  # contexts per model call: a few ms of user pass on 2 cores
MAX_WAITING = 1024  # contexts queued at most; past it the oldest are dropped (a hint, not a duty)


class UserSidePreparer:
    """`__call__(profiles)`: the serving re-ranker's user side for each profile's context
    (without a query: what a Recommend without one reads), on `worker`, `CHUNK` at a time."""

    def __init__(self, worker: TorchWorker, reranker: Callable[[], CrossEncoderReranker]) -> None:
        self.worker = worker
        self.reranker = reranker
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._scheduled = False  # a `_run` is queued on the worker or running

    def __call__(self, profiles: Sequence[UserProfile]) -> None:
        texts = [user_context_text(p) for p in profiles]
        with self._lock:
            for text in texts:
                self._waiting[text] = None
                self._waiting.move_to_end(text)
            while len(self._waiting) > MAX_WAITING:
                self._waiting.popitem(last=False)
            if self._scheduled or not self._waiting:
                return
            self._scheduled = True
        self.worker.submit(self._run)

    def _run(self) -> None:
        with self._lock:
            chunk = [
                self._waiting.popitem(last=False)[0] for _ in range(min(CHUNK, len(self._waiting)))
            ]
        try:
            # The version serving now: after a swap its successor's.
            metrics.USER_STATES_PREPARED.inc(self.reranker().prepare_users(chunk))
        except Exception:  # a hint: a request computes its own if this failed
            log.exception("could not prepare the user side of %d contexts", len(chunk))
        with self._lock:
            self._scheduled = bool(self._waiting)
            if not self._scheduled:
                return
        self.worker.submit(self._run)  # behind the model calls queued meanwhile

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)
