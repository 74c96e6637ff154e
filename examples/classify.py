"""Sequence classification with LoReFT on an encoder (the ReFT paper's GLUE setting), end to end on CPU.

    python examples/classify.py --steps 300

What it does, with no download:
1. builds a tiny random-init RoBERTa (or --arch bert) sequence classifier from a config;
2. hooks LoReFT into every layer's block output at the first token ("f1": RoBERTa's <s>, which its
   classification head reads) and unfreezes the head (unfrozen_modules=["classifier"]); the rest of the
   encoder stays frozen;
3. trains on a synthetic task a tiny model can learn (label = which of three marker tokens occurs in a
   sequence of filler tokens) with the stock transformers.Trainer (no subclass, its default arguments, and
   rk.ReftDataCollator);
4. prints accuracy before and after, saves the adapter with save_pretrained, rebuilds it on a fresh copy
   of the base model with ReftModel.from_pretrained, and checks the reloaded model gives the same logits.

With a real checkpoint, replace build_base() by AutoModelForSequenceClassification.from_pretrained(name,
num_labels=...) and the synthetic data by tokenized text; the rest is unchanged. On a GPU, leave the
intervention dtype at its default (bf16 weights, fp32 rotation) or keep float32 as here.

main(argv) returns a dict (accuracies, the trained and reloaded ReftModel, the base model's parameters
before training, an evaluation batch) for tests/test_hf_classification.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import transformers

try:
    import reft_kernels as rk
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import reft_kernels as rk

VOCAB = 96
BOS, PAD, EOS = 0, 1, 2
MARKERS = (4, 5, 6)  # label k <=> MARKERS[k] occurs in the sequence
FILLER = (10, VOCAB)  # filler tokens are drawn from [10, VOCAB)
NUM_LABELS = len(MARKERS)


def build_base(arch: str = "roberta", seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random-init encoder with a 3-way classification head (stands in for a pretrained one)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=128, num_labels=NUM_LABELS,
                  # a random encoder at the usual init (0.02) all but averages the tokens away at <s>; 0.1
                  # keeps this tiny stand-in informative. Dropout off: it is the whole signal path here.
                  initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "roberta":
        cfg = transformers.RobertaConfig(type_vocab_size=1, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                                         max_position_embeddings=70, **common)
    elif arch == "bert":
        cfg = transformers.BertConfig(type_vocab_size=2, pad_token_id=PAD, max_position_embeddings=64, **common)
    else:
        raise ValueError(f"arch must be 'roberta' or 'bert', got {arch!r}")
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def make_examples(n: int, seed: int, num_interventions: int, positions: str, min_len: int = 4,
                  max_len: int = 10) -> list[dict]:
    """<s> filler... marker ...filler </s>, label = index of the marker; intervention_locations from the
    sequence's own mask (every example is unpadded here; ReftDataCollator pads the batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        body = torch.randint(*FILLER, (length,), generator=g)
        label = int(torch.randint(NUM_LABELS, (), generator=g))
        body[int(torch.randint(length, (), generator=g))] = MARKERS[label]
        ids = torch.cat([torch.tensor([BOS]), body, torch.tensor([EOS])])
        mask = torch.ones(1, len(ids), dtype=torch.long)
        if positions == "last":
            locs = rk.last_token_locations(mask, num_interventions=num_interventions)
        else:
            locs = rk.prefix_suffix_locations(mask, positions, num_interventions=num_interventions)
        out.append({"input_ids": ids, "intervention_locations": locs[0], "labels": torch.tensor(label)})
    return out


@torch.no_grad()
def logits_of(reft: rk.ReftModel, batch: dict) -> torch.Tensor:
    was_training = reft.training
    reft.eval()
    inputs = {k: v.to(reft.device) for k, v in batch.items() if k != "labels"}
    logits = reft(**inputs).logits
    reft.train(was_training)
    return logits


def accuracy(reft: rk.ReftModel, batch: dict) -> float:
    return (logits_of(reft, batch).argmax(-1).cpu() == batch["labels"]).float().mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="roberta", choices=("roberta", "bert"))
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=4, help="LoReFT low_rank_dimension")
    ap.add_argument("--positions", default="f1", help="'f1' (first token, default), 'l1', 'f1+l1' or 'last'")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None, help="where Trainer and the adapter write (default: a temp dir)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.quiet else print

    base = build_base(args.arch, args.seed)
    layers = base.config.num_hidden_layers
    torch.manual_seed(args.seed + 1)
    config = rk.ReftConfig(
        representations=[{"layer": l, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": args.rank, "dtype": "float32"} for l in range(layers)],
        positions=None if args.positions == "last" else args.positions,
        unfrozen_modules=["classifier"])
    reft = rk.get_reft_model(base, config)
    if not args.quiet:
        reft.print_trainable_parameters()
    initial = {n: p.detach().clone() for n, p in reft.named_parameters()}

    n = reft.num_interventions
    train = make_examples(args.train_size, args.seed + 10, n, args.positions)
    collate = rk.ReftDataCollator(pad_token_id=PAD)
    eval_batch = collate(make_examples(args.eval_size, args.seed + 20, n, args.positions))
    acc_before = accuracy(reft, eval_batch)
    say(f"accuracy before training: {acc_before:.3f} (chance {1 / NUM_LABELS:.3f})")

    tmp = None
    out_dir = args.output_dir
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="reft_classify_")
        out_dir = tmp.name
    try:
        training_args = transformers.TrainingArguments(
            output_dir=os.path.join(out_dir, "trainer"), max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="linear",
            warmup_steps=min(20, args.steps // 10), weight_decay=0.0, logging_steps=max(1, args.steps // 5),
            save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
            log_level="warning" if args.quiet else "passive")
        trainer = transformers.Trainer(model=reft, args=training_args, train_dataset=train, data_collator=collate)
        if args.quiet:
            trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        acc_after = accuracy(reft, eval_batch)
        say(f"accuracy after {args.steps} steps: {acc_after:.3f}")

        adapter_dir = os.path.join(out_dir, "adapter")
        reft.save_pretrained(adapter_dir)
        say(f"saved: {sorted(os.listdir(adapter_dir))}")
        fresh = build_base(args.arch, args.seed)  # with a real model: from_pretrained(name) again
        reloaded = rk.ReftModel.from_pretrained(fresh, adapter_dir)
        same = torch.equal(logits_of(reft, eval_batch), logits_of(reloaded, eval_batch))
        say(f"reloaded adapter gives the same logits: {same}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"acc_before": acc_before, "acc_after": acc_after, "reft": reft, "reloaded": reloaded,
            "initial_parameters": initial, "eval_batch": eval_batch, "reload_equal": same,
            "log_history": trainer.state.log_history}


if __name__ == "__main__":
    sys.exit(0 if main()["reload_equal"] else "the reloaded adapter's logits differ from the trained model's")
