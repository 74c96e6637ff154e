"""`reft-kernels bench` with pyreft beside reft_kernels (pyreft imports only in this transformers 4.45.1
environment): the pyreft provider builds the adapter's interventions in pyreft, trains and generates with
them in the same run, and its rows carry positive numbers and an overhead from the same run."""
from __future__ import annotations

import json
import math

from reft_kernels.bench import cli


def test_pyreft_beside_reft_kernels(tmp_path, pyreft, capsys):
    from transformers import LlamaConfig

    model = tmp_path / "tiny-llama"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64, max_position_embeddings=128).save_pretrained(model)
    out = tmp_path / "out"
    code = cli.main(["--model", str(model), "--random-weights", "--adapter", "loreft r=2 layers=all positions=f2+l2",
                     "--providers", "frozen", "reft_kernels", "pyreft", "--batch", "2", "--prompt", "8", "--output", "3",
                     "--rounds", "1", "--steps", "1", "--threads", "1", "--no-profile", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert "pyreft" not in data["skipped"], data["skipped"]
    assert data["env"]["pyreft"] != "not installed"
    for mode in ("train", "prefill", "decode"):
        rows = {r["provider"]: r for r in data["rows"] if r["mode"] == mode}
        assert set(rows) == {"frozen", "reft_kernels", "pyreft"}, mode
        p = rows["pyreft"]
        assert p["median_ms"] > 0 and p["peak_MB"] > 0
        assert math.isclose(p["overhead_pct"], 100 * (p["median_ms"] / rows["frozen"]["median_ms"] - 1))
        # the same interventions: as many parameters as reft_kernels' (pyreft's R is [d, r] + a d x d base
        # buffer, not a parameter; ours stores base and delta, of which delta is the parameter)
        assert p["params"] == rows["reft_kernels"]["params"], (p["params"], rows["reft_kernels"]["params"])
