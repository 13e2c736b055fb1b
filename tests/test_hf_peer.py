"""The independent peer: HF transformers' native ``DeepseekV3ForCausalLM`` with our weights gives our logits.

The mapping of config and names (``weights_tools/hf_peer.py``, shared with the trace tool): YaRN as
transformers-5 ``rope_parameters``, ``rope_interleave=True``, routed experts fused into HF's 3-D
``experts.gate_up_proj`` / ``experts.down_proj``, INT4 experts dequantized into them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tolerances import assert_close

from test_model import FIXTURES, VOCAB, tiny
from weights_tools.make_tiny import random_model

transformers = pytest.importorskip("transformers")

from weights_tools.hf_peer import hf_twin  # noqa: E402


_PEERS: dict = {}


def peer_pair(name: str, **tiny_kw):
    key = (name, tuple(sorted(tiny_kw.items())))
    if key not in _PEERS:
        ours = random_model(tiny(name, **tiny_kw), seed=7 + len(_PEERS))
        theirs = hf_twin(ours, attn_implementation="eager")  # raises unless every tensor finds its counterpart
        _PEERS[key] = (ours, theirs)
    return _PEERS[key]


@settings(max_examples=6)
@given(st.sampled_from(FIXTURES), st.sampled_from(["absorbed", "naive"]), st.integers(1, 2), st.integers(1, 12),
       st.integers(0, 2**31 - 1))
def test_logits_match_hf_deepseek_v3(name, mode, batch, length, seed):
    ours, theirs = peer_pair(name)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    try:
        for layer in ours.model.layers:
            layer.self_attn.mode = mode  # the same weights, the other MLA form (no cache involved)
        with torch.no_grad():
            want = theirs(ids).logits.double()
            got = ours(ids)
    finally:
        for layer in ours.model.layers:
            layer.self_attn.mode = "absorbed"
    assert_close(got, want, torch.float32, what=f"{name} ({mode}) vs HF DeepseekV3")


def test_group_limited_routing_and_long_positions_match_hf():
    """n_group 4 / topk_group 2 (HF masks with -inf too), and positions past original_max_position_embeddings
    (16 here) so the YaRN ramp between beta_fast and beta_slow is exercised."""
    ours, theirs = peer_pair("kimi_k25", n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                             original_max_position_embeddings=16)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits.double(), torch.float32, what="grouped routing, 40 tokens vs HF")


def test_hf_peer_really_depends_on_the_bias_and_interleaving():
    """Guards against a vacuous peer: breaking one Kimi quirk on HF's side must break agreement."""
    ours, theirs = peer_pair("kimi_k2_thinking")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        good = ours(ids)
        theirs.config.rope_interleave = False  # NeoX-style pairing: the "quietly broken" reading of Kimi
        try:
            broken = theirs(ids).logits
        finally:
            theirs.config.rope_interleave = True
    assert (good - broken).abs().max() > 1e-3
    gate = theirs.model.layers[1].mlp.gate
    saved = gate.e_score_correction_bias.clone()
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()  # aux-loss-free bias dropped: other experts win
        try:
            unbiased = theirs(ids).logits
        finally:
            gate.e_score_correction_bias.copy_(saved)
        assert_close(theirs(ids).logits, good.double(), torch.float32, what="restored HF peer")
    assert (good - unbiased).abs().max() > 1e-3
