"""Convert the authors' released FTI4CIR checkpoint (a pickled `i2t_model.IMG2TEXT` module) into this
repository's format, without their code installed.

    python scripts/convert_official_checkpoint.py IN.pt OUT.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from checkpoint import CheckpointError, build_network, read_authors_checkpoint, save_network  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="the authors' checkpoint file")
    parser.add_argument("output", type=Path, help="where to write the checkpoint in this repo's format")
    args = parser.parse_args(argv)
    try:
        if not args.input.is_file():
            raise CheckpointError(f"{args.input}: no such file")
        config, state_dict = read_authors_checkpoint(args.input)
        net = build_network(config, state_dict, args.input)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    save_network(net, args.output, source=str(args.input))
    print(f"wrote {args.output}: {sum(v.numel() for v in net.state_dict().values()):,} weights, config {config}")
    return args.output


if __name__ == "__main__":
    main()
