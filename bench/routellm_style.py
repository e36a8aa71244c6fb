"""RouteLLM's sw_ranking and mf routers, reimplemented small for two models, and the prompt spaces they embed
prompts in: bench/peer_routers.py trains them on the same grouped folds as farebox's own router (RouteLLM at
lm-sys/RouteLLM 0b64fda; the files are named at each function). scikit-learn is in the dev venv, not the lock."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from farebox.routing.evaluation import Floats

Ints = NDArray[np.int64]
Matrix = Floats | sparse.csr_matrix


# --- embeddings ----------------------------------------------------------------------------------------------------
class Space:
    """Prompt vectors with L2-normalised rows, so that a dot product is the cosine similarity."""

    name = ""

    def vectors(self, train: Ints, test: Ints) -> tuple[Matrix, Matrix]:
        raise NotImplementedError


class Tfidf(Space):
    """Fitted on the training prompts only, so the held-out subjects' vocabulary weights nothing."""

    name = "TF-IDF"

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = np.array(prompts, dtype=object)

    def vectors(self, train: Ints, test: Ints) -> tuple[Matrix, Matrix]:
        vec = TfidfVectorizer(sublinear_tf=True, min_df=2, ngram_range=(1, 2), max_features=100_000)
        return vec.fit_transform(self.prompts[train]), vec.transform(self.prompts[test])


class Dense(Space):
    name = "MiniLM"

    def __init__(self, matrix: Floats) -> None:
        self.matrix = matrix

    def vectors(self, train: Ints, test: Ints) -> tuple[Matrix, Matrix]:
        return self.matrix[train], self.matrix[test]


# --- RouteLLM's routers, on two models -----------------------------------------------------------------------------
def battles(strong: Floats, weak: Floats) -> Floats:
    """Each training prompt as one strong-vs-weak battle: 1 strong won, 0 weak won, 0.5 a tie."""
    return np.where(strong > weak, 1.0, np.where(weak > strong, 0.0, 0.5))


def sw_ranking_scores(x_train: Matrix, x_test: Matrix, outcome: Floats, chunk: int = 1024) -> Floats:
    """RouteLLM's sw_ranking (routellm/routers/routers.py, SWRankingRouter.calculate_strong_win_rate, with
    compute_elo_mle_with_tie in routellm/routers/similarity_weighted/utils.py): every training battle is
    weighted 10 * 10 ** (sim / max sim) by its cosine similarity to the prompt, a Bradley-Terry (Elo) fit on
    the weighted battles with a tie as half a win each way, and the score is the strong model's win rate.
    With only the two models the Elo MLE has a closed form, the weighted win share, which is what this returns
    (their logistic regression without intercept and penalty finds the same)."""
    out = []
    for start in range(0, x_test.shape[0], chunk):
        sim = x_test[start : start + chunk] @ x_train.T
        sim = sim.toarray() if sparse.issparse(sim) else np.asarray(sim, dtype=np.float64)
        top = sim.max(axis=1, keepdims=True)
        rel = np.divide(sim, top, out=np.zeros_like(sim), where=top > 0)  # no shared term at all: even weights
        weights = 10.0 * 10.0**rel
        out.append(weights @ outcome / weights.sum(axis=1))
    return np.concatenate(out)


def mf_scores(x_train: Matrix, x_test: Matrix, outcome: Floats) -> Floats:
    """RouteLLM's mf (routellm/routers/matrix_factorization/model.py and train_matrix_factorization.py): the
    logit that model a beats model b on a prompt is c . ((P_a/|P_a| - P_b/|P_b|) * W e), trained by BCE on the
    battles with a winner (ties dropped), no bias anywhere. With two models that is a linear logit v . e with no
    intercept, so this fits exactly that: a logistic regression without intercept, L2 (C=1) standing in for their
    weight decay and embedding noise. The score is the logit (the win rate's monotone transform)."""
    decided = outcome != 0.5
    model = LogisticRegression(fit_intercept=False, C=1.0, max_iter=2000)
    model.fit(x_train[decided], outcome[decided] == 1.0)
    return np.asarray(model.decision_function(x_test), dtype=np.float64)


LEARNED: dict[str, Callable[[Matrix, Matrix, Floats], Floats]] = {
    "RouteLLM sw_ranking": sw_ranking_scores,
    "RouteLLM mf": mf_scores,
}
