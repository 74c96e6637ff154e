"""Tiny random-init Hugging Face models for the integration tests (no downloads).

ARCHS names the nine architectures the integration is proven on. Widths are not powers of two (48), the
configs are the smallest that keep each architecture's structure (GQA where it has it, tied embeddings
where it ties them), and every model is built in fp32 eval mode from a fixed seed.
"""
from __future__ import annotations

import torch
import transformers

DECODERS = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "phi3")
ENCODERS = ("bert", "roberta")
ARCHS = DECODERS + ENCODERS
VOCAB = 96
WIDTH = 48
LAYERS = 3


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=80, max_position_embeddings=64)
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
    elif arch == "gemma":
        # hidden_activation: transformers 4.x's name for the MLP activation (it warns and falls back to
        # gelu_pytorch_tanh without it); 5.x keeps it as an unused attribute and reads hidden_act
        cfg = transformers.GemmaConfig(num_key_value_heads=1, head_dim=12, hidden_act="gelu_pytorch_tanh",
                                       hidden_activation="gelu_pytorch_tanh", **common)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(rotary_pct=0.5, **common)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    elif arch == "bert":
        cfg = transformers.BertConfig(type_vocab_size=2, **common)
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(type_vocab_size=1, pad_token_id=1, **{**common, "max_position_embeddings": 70})
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, seed: int = 0, head: str = "auto", **overrides) -> torch.nn.Module:
    """head: "auto" (causal LM for decoders, sequence classification with 3 labels for encoders),
    "causal", "classify", or "masked" (masked LM: per-token logits from an encoder)."""
    cfg = tiny_config(arch, **overrides)
    if head == "auto":
        head = "causal" if arch in DECODERS else "classify"
    torch.manual_seed(seed)
    if head == "causal":
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    elif head == "masked":
        model = transformers.AutoModelForMaskedLM.from_config(cfg)
    elif head == "classify":
        cfg.num_labels = 3
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        raise ValueError(f"head must be 'auto', 'causal', 'classify' or 'masked', got {head!r}")
    return model.eval()


TEXT = "abcdefghijklmnopqrstuvwxyz ?!.,"


def char_tokenizer():
    """A character tokenizer with BOS (1) prepended and EOS (2), as a transformers fast tokenizer (no
    download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(TEXT)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                clean_up_tokenization_spaces=False)
