"""Boosted regression trees for the learned router: fitted with scikit-learn, served with numpy alone.

Training (``fit_boosted``) is gradient boosting on squared loss over scikit-learn's ``DecisionTreeRegressor``,
which takes monotone constraints (prompt length may only raise the predicted gain, so the model cannot learn
that long prompts are easy from one subject's quirks). The trees are read from their public ``tree_`` arrays
into ``Trees``, which the router file stores as plain lists and the route stage evaluates with a few numpy
operations per batch: no scikit-learn, no pickle at serving time. scikit-learn is only needed to train
(``pip install 'farebox[train]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from farebox.routing.catalog import CatalogError

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]

# The settings of the shipped router, not tuned on its evaluation: shallow trees with large leaves, so each
# split rests on hundreds of prompts, and a small learning rate.
TREES = 200
DEPTH = 2
LEARNING_RATE = 0.05
MIN_LEAF = 200
MAX_DEPTH = 8  # what a router file may ask for


class TreesError(CatalogError):
    """Tree arrays in a router file that do not form valid trees."""


@dataclass(frozen=True)
class Trees:
    """An additive ensemble: ``base`` plus, per tree, the value of the leaf a row reaches. Node arrays are
    (trees, nodes); a leaf has feature -1 and points to itself, so ``depth`` steps land every row on a leaf.
    A row goes left when its feature value, as float32 (scikit-learn's split precision), is <= threshold."""

    base: float
    depth: int
    feature: Ints
    threshold: Floats
    left: Ints
    right: Ints
    value: Floats  # already scaled by the learning rate

    def predict(self, x: Floats) -> Floats:
        # Flat node arrays (a leaf splits on feature 0 into itself), one gather per level: the route stage
        # scores one prompt at a time, where each numpy call's fixed cost, not the arithmetic, is what counts.
        x32 = np.asarray(x, dtype=np.float32)
        n, k = x32.shape
        first, feature, threshold, left, right, value = self._flat
        values = x32.ravel()
        rows = (np.arange(n) * k)[:, None]
        at = first + np.zeros((n, 1), dtype=np.int64)
        for _ in range(self.depth):
            at = np.where(values[rows + feature[at]] <= threshold[at], left[at], right[at])
        out: Floats = self.base + value[at].sum(axis=1)
        return out

    @cached_property
    def _flat(self) -> tuple[Ints, Ints, Floats, Ints, Ints, Floats]:
        """Roots, features, thresholds, children (as flat indices) and values, over all trees' nodes in a row."""
        trees, nodes = self.feature.shape
        first = np.arange(trees) * nodes
        offset = np.repeat(first, nodes)
        return (
            first,
            np.maximum(self.feature.ravel(), 0),
            self.threshold.ravel(),
            self.left.ravel() + offset,
            self.right.ravel() + offset,
            self.value.ravel(),
        )

    def as_document(self) -> dict[str, Any]:
        return {
            "kind": "boosted-trees",
            "base": self.base,
            "depth": self.depth,
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "value": self.value.tolist(),
        }


def _matrix(doc: dict[str, Any], key: str, kind: type, where: str) -> NDArray[Any]:
    rows = doc.get(key)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise TreesError(f"{where}: trees field {key!r} must be a non-empty list of non-empty lists")
    if len({len(r) for r in rows}) != 1:
        raise TreesError(f"{where}: trees field {key!r} has trees of different node counts")
    try:
        out = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise TreesError(f"{where}: trees field {key!r} must hold numbers") from None
    if not np.all(np.isfinite(out)) or (kind is int and np.any(out != np.round(out))):
        raise TreesError(f"{where}: trees field {key!r} must hold finite {kind.__name__}s")
    return out.astype(np.int64) if kind is int else out


def trees_from_document(doc: object, n_features: int, where: str) -> Trees:
    """Check a stored ensemble (``Trees.as_document``) against the number of features it reads."""
    if not isinstance(doc, dict) or doc.get("kind") != "boosted-trees":
        raise TreesError(f'{where}: the choice model must be {{"kind": "boosted-trees", ...}}')
    depth, base = doc.get("depth"), doc.get("base")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_DEPTH:
        raise TreesError(f"{where}: trees depth must be an integer from 1 to {MAX_DEPTH}")
    if not isinstance(base, int | float) or not np.isfinite(base):
        raise TreesError(f"{where}: trees base must be a finite number")
    feature, left, right = (_matrix(doc, k, int, where) for k in ("feature", "left", "right"))
    threshold, value = (_matrix(doc, k, float, where) for k in ("threshold", "value"))
    if len({a.shape for a in (feature, left, right, threshold, value)}) != 1:
        raise TreesError(f"{where}: the trees' node arrays differ in shape")
    nodes = feature.shape[1]
    if np.any(feature < -1) or np.any(feature >= n_features):
        raise TreesError(f"{where}: a tree splits on a feature the router does not read")
    for child in (left, right):
        if np.any(child < 0) or np.any(child >= nodes):
            raise TreesError(f"{where}: a tree points to a node it does not have")
    _check_shape(feature, left, right, depth, where)
    return Trees(float(base), depth, feature, threshold, left, right, value)


def _check_shape(feature: Ints, left: Ints, right: Ints, depth: int, where: str) -> None:
    """Each node a leaf (feature -1, both children itself) or a split whose children come after it (so no
    cycle), and no split deeper than ``depth`` steps can pass: ``predict`` must end every row on a leaf."""
    index = np.arange(feature.shape[1])
    leaf = feature == -1
    if np.any(leaf & ((left != index) | (right != index))):
        raise TreesError(f"{where}: a leaf of a tree does not point to itself")
    if np.any(~leaf & ((left <= index) | (right <= index))):
        raise TreesError(f"{where}: a split of a tree points back (children must come after it)")
    level = np.full(feature.shape, -1, dtype=np.int64)
    level[:, 0] = 0
    for node in index:  # children come after their parent: one pass in order sets every reachable level
        parent = (level[:, node] >= 0) & ~leaf[:, node]
        for child in (left, right):
            rows = np.flatnonzero(parent)
            level[rows, child[rows, node]] = level[rows, node] + 1
    if np.any((level >= depth) & ~leaf):
        raise TreesError(f"{where}: a tree has splits deeper than its depth {depth}")


def _from_sklearn(trees: Sequence[Any], base: float, depth: int, rate: float) -> Trees:
    """Pad scikit-learn trees' public arrays to one node count, leaves pointing to themselves."""
    nodes = max(t.tree_.node_count for t in trees)
    shape = (len(trees), nodes)
    feature = np.full(shape, -1, dtype=np.int64)
    threshold = np.zeros(shape)
    left = np.tile(np.arange(nodes), (len(trees), 1))
    right = left.copy()
    value = np.zeros(shape)
    for i, fitted in enumerate(trees):
        t = fitted.tree_
        count = t.node_count
        split = t.children_left >= 0
        feature[i, :count] = np.where(split, t.feature, -1)
        threshold[i, :count] = np.where(split, t.threshold, 0.0)
        left[i, :count] = np.where(split, t.children_left, np.arange(count))
        right[i, :count] = np.where(split, t.children_right, np.arange(count))
        value[i, :count] = rate * t.value[:, 0, 0]
    return Trees(base, depth, feature, threshold, left, right, value)


def leaf_size(rows: int, min_leaf: int = MIN_LEAF) -> int:
    """The smallest leaf the trees may have: ``min_leaf`` rows, or a quarter of a smaller training set."""
    return max(1, min(min_leaf, rows // 4))


def fit_boosted(
    x: Floats,
    y: Floats,
    monotone: Sequence[int],
    *,
    trees: int = TREES,
    depth: int = DEPTH,
    rate: float = LEARNING_RATE,
    min_leaf: int = MIN_LEAF,
) -> Trees:
    """Gradient boosting (squared loss) of ``trees`` regression trees; ``monotone`` per column: 1 rising, 0 free."""
    try:
        from sklearn.tree import DecisionTreeRegressor  # type: ignore[import-untyped]
    except ImportError:
        raise ImportError("training a router needs scikit-learn: pip install 'farebox[train]'") from None
    base = float(y.mean())
    pred = np.full(len(y), base)
    fitted = []
    leaf = leaf_size(len(y), min_leaf)
    for _ in range(trees):
        tree = DecisionTreeRegressor(
            max_depth=depth, min_samples_leaf=leaf, monotonic_cst=list(monotone), random_state=0
        )
        tree.fit(x, y - pred)
        pred += rate * tree.predict(x)
        fitted.append(tree)
    return _from_sklearn(fitted, base, depth, rate)
