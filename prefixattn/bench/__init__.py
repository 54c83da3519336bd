"""Benchmarks for prefixattn (the `prefixattn bench` command and benchmarks/*.py).

Modules: timing (timing, input rotation, result records, progress), attention (training-shape attention
against the baselines of docs/design.md), decode (decode kernels against concat + SDPA), e2e (a 1.1B
Llama-shaped model: training step and generation through transformers), serving (vLLM + prefixattn against
plain vLLM and HF generate(); merge_prefix alone), summary (tables from saved JSON).
Nothing is imported here, so `import prefixattn` never pays for the benchmarks.
"""

COMMANDS = ("attention", "decode", "e2e", "serving", "summary")


def run(argv=None) -> int:
    """Entry point for `prefixattn bench [attention|decode|e2e|serving|summary] [options]` (default: attention)."""
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    name = "attention"
    if argv and argv[0] in COMMANDS:
        name = argv.pop(0)
    module = importlib.import_module(f"{__name__}.{name}")
    return module.main(argv)
