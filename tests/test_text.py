"""The text encoder: a real BERT (the packaged MiniLM), batched, real tokens only."""

import numpy as np
import pytest
import torch

from vdm.text import PACKAGED_ENCODER, TEXT_DTYPES, TextEncoder, pad_embeddings, resolve_encoder, resolve_text_dtype


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(PACKAGED_ENCODER, max_tokens=16, batch_size=2)


def test_reduced_precision_encoding_stays_close_to_fp32(encoder):
    """bf16 autocast (what vdm-shard picks on AMX/AVX512-BF16 CPUs and GPUs) really runs in bf16 and
    moves the embeddings by well under what their fp16 storage and training noise can tell apart."""
    texts = ["a red circle moving left", "a small shiny blue square moving up quickly near the edge"]
    bf16 = TextEncoder(PACKAGED_ENCODER, max_tokens=16, batch_size=2, dtype="bfloat16")
    assert encoder.dtype == "float32" and bf16.dtype == "bfloat16"
    for a, b in zip(encoder.encode(texts), bf16.encode(texts)):
        a, b = torch.from_numpy(a).float(), torch.from_numpy(b).float()
        assert a.shape == b.shape
        assert not torch.equal(a, b), "the bf16 encoder must not silently run in fp32"
        assert (a - b).norm() / a.norm() < 0.02
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999


def test_text_dtype_names_are_checked_and_auto_resolves():
    with pytest.raises(ValueError, match="float32, bfloat16"):
        resolve_text_dtype("bf16", torch.device("cpu"))
    assert resolve_text_dtype("float16", torch.device("cpu")) == "float16"
    # auto on CPU: bf16 exactly where the CPU multiplies it natively, as /proc/cpuinfo says.
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert resolve_text_dtype("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert set(TEXT_DTYPES) == {"auto", "float32", "bfloat16", "float16"}


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
