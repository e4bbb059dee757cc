"""A user's own dataset: a callable returning {"train": (x, y), "test": (x, y)} (``val`` optional)."""
import numpy as np


def load_splits(n_train: int = 600, n_test: int = 200, num_classes: int = 4, seed: int = 0) -> dict:
    """Each class is a fixed random 8×8 pattern plus noise; ``x`` is N×1×8×8 float in [0, 1], ``y`` int labels.
    kdrun carves the validation split from train (``dataset.val_fraction``) because none is returned."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 1, size=(num_classes, 1, 8, 8)).astype(np.float32)

    def make(n):
        y = rng.integers(0, num_classes, size=n)
        x = np.clip(patterns[y] + rng.normal(0, 0.35, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y

    return {"train": make(n_train), "test": make(n_test)}
