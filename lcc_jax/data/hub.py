"""The one place that imports `datasets`: only when a user names a hub data set and no local copy exists."""

from __future__ import annotations


def load_hub_split(dataset: str, config: str | None, split: str, *, data_files=None, hint: str, error: type[Exception]):
    """datasets.load_dataset(...) for one split; every failure becomes `error` with `hint` on what to do offline."""
    try:
        import datasets
    except ImportError as e:
        raise error(f"loading {dataset!r} from the hub needs `pip install datasets`. {hint}") from e
    try:
        return datasets.load_dataset(dataset, config, split=split, data_files=data_files)
    except Exception as e:  # offline, unknown set, no such split: all end the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]  # `datasets` can say a page
        raise error(f"could not load {dataset!r} ({config}, {split}) from the hub: {first}. {hint}") from e
