"""Latency benchmarking of a model with a ReFT adapter: the `reft-kernels bench` command (cli.py; also
`python -m reft_kernels.bench`), and the timing, measurement and reporting it is made of, which the
repository's own benchmark suites (bench/) reuse:

- timing.py     clocks, medians and spreads, interleaved rounds, CPU threads, peak memory, progress bars
- report.py     the environment header, tables, md/csv/json results
- models.py     the base model: a local directory, a Hugging Face name, a built-in Llama shape; random weights
- adapters.py   the adapter: a spec string, a reft_kernels directory, a pyreft checkpoint
- providers.py  what is compared: frozen (and the training floor), reft_kernels, pyreft, PEFT LoRA
- measure.py    measurement blocks for train, prefill and decode, the runner, the result rows
- breakdown.py  the profiler pass: the adapter's time by component
- plot.py       the command's figure
Nothing else in reft_kernels imports this package.
"""
