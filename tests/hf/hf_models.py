"""Tiny transformers models built from configs (no downloads), fp32, no dropout."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96


def _decoder_common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


def build(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(**_decoder_common(**overrides))
        model = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**_decoder_common(**overrides))
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**_decoder_common(**{"head_dim": 16, **overrides}))
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "mistral":  # explicit head_dim != hidden / heads (Mistral-Nemo pattern)
        cfg = tf.MistralConfig(**_decoder_common(**{"head_dim": 16, "sliding_window": None, **overrides}))
        model = tf.MistralForCausalLM(cfg)
    elif family == "gpt2":
        kw = dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(overrides)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**kw))
    elif family == "bart":
        kw = dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            forced_eos_token_id=None,
            init_std=0.25,
        )  # BART's default 0.02 makes prefix effects too small to test
        kw.update(overrides)
        model = tf.BartForConditionalGeneration(tf.BartConfig(**kw))
    elif family == "t5":
        kw = dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
        kw.update(overrides)
        model = tf.T5ForConditionalGeneration(tf.T5Config(**kw))
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = None  # generate the full length: comparable token by token
    return model.eval()


ENC_DEC = ("bart", "t5")
DECODER_ONLY = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
ALL = DECODER_ONLY + ENC_DEC


def batch(family: str, seed: int = 1, b: int = 3, s: int = 7):
    """Inputs with padding: left padding for decoder-only models, padded encoder inputs (and a right-padded
    decoder) for encoder-decoders. Returns (kwargs, real_mask [B, S_out])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :3] = 0
    if b > 2:
        mask[2, :1] = 0
    if family in ENC_DEC:
        enc_mask = mask.flip(1)  # right-padded encoder input
        ids = ids.masked_fill(enc_mask == 0, 0)
        dec = torch.randint(3, VOCAB, (b, 5), generator=g)
        dec_mask = torch.ones(b, 5, dtype=torch.long)
        dec_mask[1, 3:] = 0
        return dict(
            input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
        ), dec_mask.bool()
    ids = ids.masked_fill(mask == 0, 0)
    return dict(input_ids=ids, attention_mask=mask), mask.bool()
