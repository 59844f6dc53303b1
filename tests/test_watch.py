"""Watching a run: the learning-rate schedule, the metrics log, held-out validation and document-aware packing."""
import math

import pytest
import torch

from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM, DocumentMask
from training.documents import document_inputs
from training.schedule import WarmupCosine, schedule_from_config

EOS = 2


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, loss_chunk_size=0, use_cache=False)
    fields.update(overrides)
    return BaiChuanForCausalLM(BaiChuanConfig(**fields)).eval()


def packed_rows(seed=0):
    """Two rows of documents (each ending with EOS) packed end to end; the first row starts mid-document."""
    g = torch.Generator().manual_seed(seed)
    docs = [[*torch.randint(3, 512, (n,), generator=g).tolist(), EOS] for n in (6, 11, 3, 9, 14, 4, 7)]
    # The documents as they appear in the rows: the first and the last piece of row 0 are cut by packing.
    pieces = [[docs[0][2:], docs[1], docs[2], docs[3][:5]], [docs[4], docs[5], docs[6]]]
    width = 40
    for docs_of_row in pieces:
        if docs_of_row[-1][-1] != EOS:  # the cut document runs on to the first EOS of the padding
            docs_of_row[-1] = docs_of_row[-1] + [EOS]
        docs_of_row += [[EOS]] * (width - sum(map(len, docs_of_row)))  # then one-token documents
    rows = [[t for d in docs_of_row for t in d] for docs_of_row in pieces]
    return torch.tensor(rows), pieces


def test_document_inputs_restart_positions_and_drop_cross_document_labels():
    batch, pieces = packed_rows()
    out = document_inputs(batch, EOS)
    for r, docs in enumerate(pieces):
        expected_pos = [i for d in docs for i in range(len(d))]
        expected_doc = [j for j, d in enumerate(docs) for _ in d]
        assert out["position_ids"][r].tolist() == expected_pos
        assert out["document_ids"][r].tolist() == expected_doc
        firsts = {sum(map(len, docs[:j])) for j in range(1, len(docs))}
        assert [i for i, y in enumerate(out["labels"][r].tolist()) if y == -100] == sorted(firsts)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_loss_equals_documents_run_one_by_one(backend):
    model = tiny_model(attention_backend=backend)
    batch, pieces = packed_rows()
    inputs = document_inputs(batch, EOS)
    with torch.no_grad():
        packed = model(batch, **inputs).loss
        # Each document alone: its summed next-token loss and the number of predictions it makes.
        total, count = 0.0, 0
        for docs in pieces:
            for d in docs:
                if len(d) < 2:
                    continue
                ids = torch.tensor([d])
                total += model(ids, labels=ids).loss.item() * (len(d) - 1)
                count += len(d) - 1
    assert packed.item() == pytest.approx(total / count, abs=1e-5)
    # Without the mask the packed rows attend across documents: a different loss.
    with torch.no_grad():
        plain = model(batch, labels=batch).loss.item()
    assert abs(plain - packed.item()) > 1e-3


def test_document_mask_of_one_document_is_plain_causal_attention():
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        plain = model(ids, labels=ids).logits
        one_doc = model(ids, labels=ids, document_ids=torch.zeros_like(ids),
                        position_ids=torch.arange(24).expand(2, 24)).logits
    torch.testing.assert_close(one_doc, plain, rtol=0, atol=1e-5)


def test_document_mask_varlen_layout():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    cu, longest = DocumentMask(ids).varlen()
    assert cu.tolist() == [0, 2, 5, 6, 7, 12] and longest == 5
    dense = DocumentMask(ids).dense()
    assert dense.shape == (2, 1, 6, 6)
    assert dense[0, 0, 3].tolist() == [False, False, True, True, False, False]
