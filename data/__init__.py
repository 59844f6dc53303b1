"""Pretraining data: sources and mixtures (sources.py), the token cache (cache.py), the global sample order
(order.py), and the engines that serve batches: the global order (engine.py, the default) and the reference's
per-rank order (per_rank.py). ``make_engine`` is what train.py calls."""
from .cache import DataWarning, TokenCache, load_tokenizer
from .engine import GlobalDataEngine, compare_fingerprints, split_global_batch
from .per_rank import DataEngine
from .sources import list_data_files

DATA_ORDERS = ("global", "per_rank")


def make_engine(data_order: str, **kw):
    """The engine for --data_order: "global" (GlobalDataEngine) or "per_rank" (the reference's DataEngine; it has
    no mixture, and its checkpoints resume only on the same world size)."""
    if data_order == "global":
        return GlobalDataEngine(**kw)
    if data_order == "per_rank":
        if kw.pop("data_mix", None) is not None:
            raise ValueError("--data_mix needs --data_order global (the per-rank order reads whole files per rank)")
        kw.pop("global_batch_size", None)
        kw.pop("num_batches", None)
        return DataEngine(**kw)
    raise ValueError(f"--data_order must be one of {DATA_ORDERS}, got {data_order!r}")


__all__ = ["DATA_ORDERS", "DataEngine", "DataWarning", "GlobalDataEngine", "TokenCache", "compare_fingerprints",
           "list_data_files", "load_tokenizer", "make_engine", "split_global_batch"]
