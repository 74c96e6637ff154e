"""Quickstart: train a LoReFT adapter on CPU in well under a minute, generate with it, save it, load it.

A tiny random-init Llama (no download) learns to answer a few prompts the way pyreft's emoji demo does:
only the interventions train (the model stays frozen), the edits sit on the prompt's first and last
tokens of every layer, and the answer is produced by generate() with the prompt edited once at prefill.

    python examples/quickstart.py            # about 20 s on a 2-core CPU
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from tqdm.auto import tqdm

import reft_kernels as rk

PAIRS = [
    ("Which dog breed do people think is cuter, poodle or doodle?", "🐶🔁🐩❓"),
    ("What is the capital of France?", "🇫🇷🗼🥖"),
    ("How do I bake bread?", "🌾💧🔥🍞"),
    ("Say something nice.", "🌞😊🌈"),
]


class CharTokenizer:
    """One token per character (ids 0-2 reserved: pad, bos, eos): enough for a demo with no download."""

    def __init__(self, texts):
        self.chars = sorted({c for t in texts for c in t})
        self.ids = {c: i + 3 for i, c in enumerate(self.chars)}
        self.pad, self.bos, self.eos = 0, 1, 2
        self.vocab_size = len(self.chars) + 3

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tok = CharTokenizer([t for pair in PAIRS for t in pair])

    # 1. a frozen base model (random weights here; any Hugging Face causal LM works the same way)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
                                      pad_token_id=tok.pad, bos_token_id=tok.bos, eos_token_id=tok.eos)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # a random model with the usual 0.02-std head cannot memorize at all

    # 2. the adapter: LoReFT rank 8 on every layer's residual stream, at the prompt's first 5 and last 5 tokens
    reft_config = rk.ReftConfig(
        representations=[{"layer": l, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 8, "dtype": torch.float32} for l in range(4)],
        positions="f5+l5")
    reft = rk.get_reft_model(model, reft_config)
    reft.print_trainable_parameters()

    # 3. data: prompt + answer + eos, loss on the answer only, locations from each prompt
    examples = [rk.reft_example([tok.bos] + tok.encode(p), tok.encode(a) + [tok.eos], reft_config,
                                reft.num_interventions) for p, a in PAIRS]
    batch = rk.ReftDataCollator(pad_token_id=tok.pad)(examples)

    # 4. train (a plain loop; the stock transformers.Trainer works too: tests/test_hf_model.py)
    optimizer = torch.optim.AdamW([p for p in reft.parameters() if p.requires_grad], lr=1e-2)
    reft.train()
    bar = tqdm(range(args.steps), desc="training LoReFT")
    for _ in bar:
        loss = reft(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    final_loss = loss.item()

    # 5. generate: left-padded prompts, each row's locations from its own prompt
    reft.eval()
    prompts = [[tok.bos] + tok.encode(p) for p, _ in PAIRS]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=reft.locations(mask),
                        max_new_tokens=8, do_sample=False, pad_token_id=tok.pad, eos_token_id=tok.eos)
    answers = [tok.decode(row[width:].tolist()) for row in out]
    for (prompt, want), got in zip(PAIRS, answers):
        print(f"{prompt!r} -> {got!r}  (trained on {want!r})")

    # 6. save and load back onto a fresh copy of the base model
    with tempfile.TemporaryDirectory() as d:
        reft.save_pretrained(d)
        fresh = transformers.LlamaForCausalLM(config)
        fresh.load_state_dict(model.state_dict())
        loaded = rk.ReftModel.from_pretrained(fresh, d).eval()
        again = loaded.generate(input_ids=ids, attention_mask=mask, intervention_locations=loaded.locations(mask),
                                max_new_tokens=8, do_sample=False, pad_token_id=tok.pad, eos_token_id=tok.eos)
    print("reloaded adapter generates the same tokens:", torch.equal(out, again))
    return {"final_loss": final_loss, "answers": answers, "reload_equal": torch.equal(out, again)}


if __name__ == "__main__":
    main()
