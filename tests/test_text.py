"""The text encoder: a real BERT (the packaged MiniLM), batched, real tokens only."""

import numpy as np
import pytest
import torch

from vdm.text import PACKAGED_ENCODER, TextEncoder, pad_embeddings, resolve_encoder


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(PACKAGED_ENCODER, max_tokens=16, batch_size=2)


def test_encode_keeps_real_tokens_in_fp16(encoder):
    texts = ["a red circle moving left", "a cat", "an extremely long caption " * 10]
    embs = encoder.encode(texts)
    lengths = [len(encoder.tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in texts]
    assert [e.shape for e in embs] == [(n, 384) for n in lengths]
    assert lengths[2] == 16, "truncated to max_tokens"
    assert all(e.dtype == np.float16 and np.isfinite(e).all() for e in embs)
    assert not np.allclose(embs[0][1:3], embs[1][1:3]), "different words, different embeddings"


def test_batching_and_padding_do_not_change_embeddings(encoder):
    texts = ["a blue square moving up", "a yellow triangle", "a green circle moving down quickly"]
    batched = encoder.encode(texts)  # batch_size=2: padding inside the first batch
    single = [encoder.encode([t])[0] for t in texts]
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_pad_embeddings_builds_the_mask():
    embs = [np.ones((3, 4), np.float16), 2 * np.ones((5, 4), np.float16)]
    text, mask = pad_embeddings(embs)
    assert text.shape == (2, 5, 4) and text.dtype == torch.float32
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert text[0, 3:].abs().sum() == 0 and text[1].eq(2).all()


def test_unknown_local_encoder_is_a_clear_error(tmp_path):
    assert resolve_encoder("bert-base-cased") == "bert-base-cased"
    with pytest.raises(OSError):
        TextEncoder(str(tmp_path / "no-such-model"))
