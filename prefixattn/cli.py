"""The `prefixattn` command: check, bench, demo."""

from __future__ import annotations

import sys

USAGE = """usage: prefixattn <command> [options]

commands:
  check   run every available backend on small problems against the float64 reference
  bench   benchmarks: prefixattn bench [attention|decode|e2e|serving|summary] [options] (attention by default;
          real numbers need a GPU, --smoke is a CPU dry run: tiny shapes, nothing judged)
  demo    prefix-tune a small model end to end (about 10 s on a laptop CPU; a 135M model with --model:
          about a minute): train, eject, save, reload, generate, and the KV-cache bytes a shared prefix
          saves; prefixattn demo --help for options
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .check import main as run
    elif command == "bench":
        from .bench import run
    elif command == "demo":
        from .demo import main as run
    else:
        print(f"prefixattn: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
