"""The reference's module name, kept for its users: the data path now lives in the data/ package."""
from data.cache import (CACHE_FORMAT, CHUNK_BYTES, EOS_TOKEN_ID, MIN_LINE_TOKENS, DataWarning, encode_lines,
                        is_held_out, load_tokenizer)
from data.per_rank import DataEngine
from data.sources import files_for_rank, list_data_files

__all__ = ["CACHE_FORMAT", "CHUNK_BYTES", "EOS_TOKEN_ID", "MIN_LINE_TOKENS", "DataEngine", "DataWarning",
           "encode_lines", "files_for_rank", "is_held_out", "list_data_files", "load_tokenizer"]
