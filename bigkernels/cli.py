"""The ``bigkernels`` command: ``bigkernels info`` (also ``python -m bigkernels info``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _print_info(as_json: bool) -> int:
    import bigkernels

    data = bigkernels.info()
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    ops = data.pop("ops")
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        print(f"{key:<18} {value}")
    print()
    devices = sorted({d for o in ops.values() for d in o["uses"]})
    header = f"{'op':<18} {'available backends':<40} " + " ".join(f"{d + ' uses':<12}" for d in devices)
    print(header)
    print("-" * len(header))
    for name, o in ops.items():
        print(f"{name:<18} {', '.join(o['available']):<40} " + " ".join(f"{o['uses'][d]:<12}" for d in devices))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bigkernels", description="bigkernels: fast kernels for big PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, CPU features, and which kernel each op uses here")
    p_info.add_argument("--json", action="store_true", help="print the info() dict as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
