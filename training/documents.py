"""Document-aware packing (``--document_mask``): what the model needs to keep the documents of a packed row apart.

The data engine ends every document with EOS and packs documents end to end, so the boundaries are already in
each row: a document runs up to and including its EOS, and the next one starts right after it. From them:

* ``document_ids`` [b, s]: the index of the document each token belongs to within its row; the model's kernel
  table turns it into block-causal attention (models/modeling_baichuan.py, ``DocumentMask``);
* ``position_ids`` [b, s]: positions restart at 0 at every document, as if it were the start of a sequence;
* ``labels`` [b, s]: the first token of every document after the first is not predicted (-100): the EOS before
  it sees nothing of the new document, and a document trained alone never predicts its first token either.

With these, a packed row's loss equals the token-weighted mean of its documents run one by one
(tests/test_watch.py). Megatron-LM calls this ``--reset-attention-mask --reset-position-ids``.
"""
import torch

IGNORE_INDEX = -100


def document_inputs(batch: torch.Tensor, eos_id: int) -> dict:
    """Keyword arguments for the model's forward from a packed batch [b, s] of token ids: document_ids,
    position_ids and labels (see the module docstring)."""
    is_eos = batch == eos_id  # [b, s]
    # A token after an EOS starts a new document: shift the EOS flags one to the right and count them.
    starts = torch.zeros_like(is_eos)
    starts[:, 1:] = is_eos[:, :-1]
    document_ids = starts.long().cumsum(1)  # [b, s]
    index = torch.arange(batch.shape[1], device=batch.device).expand_as(batch)  # [b, s]
    # Position = index minus the index where the current document began (the running max of start indices).
    begin = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values  # [b, s]
    labels = batch.masked_fill(starts, IGNORE_INDEX)
    return {"document_ids": document_ids, "position_ids": index - begin, "labels": labels}
