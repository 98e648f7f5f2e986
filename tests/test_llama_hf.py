"""Llama against Hugging Face transformers (optional: skipped without torch and transformers).

A small random LlamaForCausalLM (grouped-query attention, untied head) saved with
``save_pretrained`` loads with ``tinylm.models.from_hf``; its logits match within 1e-4 and greedy
generation gives the same tokens as HF's ``generate``; what ``save_hf`` writes loads back into
transformers with every tensor intact.
"""
import numpy as np
import pytest

from tinylm.models import Llama, LlamaConfig, from_hf, save_hf

IDS = np.random.default_rng(0).integers(0, 97, (2, 24))


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def _their_llama(transformers, torch, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie,
                                   attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=None)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # move every tensor off its init (RMSNorm weights are 1 there)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("tie", [False, True])
def test_tinylm_loads_a_transformers_llama(tmp_path, tie):
    torch, transformers = _hf()
    theirs = _their_llama(transformers, torch, tie)
    theirs.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    ours = from_hf(tmp_path / "hf")
    assert isinstance(ours, Llama) and ours.config.n_kv_head == 2 and ours.config.tie_embeddings == tie
    with torch.no_grad():
        ref = theirs(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(ours(IDS)[0].numpy(), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        gen = theirs.generate(torch.from_numpy(IDS[:1, :5]), max_new_tokens=12, do_sample=False,
                              pad_token_id=1).numpy()[0]
    np.testing.assert_array_equal(ours.generate(IDS[0, :5], 12, temperature=0.0), gen)


def test_transformers_loads_what_save_hf_wrote(tmp_path):
    torch, transformers = _hf()
    ours = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=97), seed=4)
    save_hf(ours, tmp_path / "saved")
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    sd = {k.removeprefix("model."): v.detach().numpy() for k, v in theirs.state_dict().items()}
    for name, p in ours.named_parameters():
        np.testing.assert_array_equal(sd[name], p.data, err_msg=name)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(ours(IDS)[0].numpy(), ref, rtol=1e-4, atol=1e-4)
