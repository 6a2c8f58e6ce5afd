"""Convert the discriminator of an NVIDIA StyleGAN2(-ADA) network pickle to a .pt file.

    PYTHONPATH=/path/to/stylegan2-ada-pytorch python tools/convert_stylegan2_nvidia.py \
        network.pkl d_stylegan2.pt --allow-pickle

The output is {"d": state_dict} in the layout of rosinality/stylegan2-pytorch's
`Discriminator`, which `disc.pretrained` reads with torch.load(weights_only=True), so
the pickle is opened once, here, and never by the training scripts.

Reading the pickle runs code from it, so the script requires --allow-pickle; use it only
for a file you trust. NVIDIA's pickles reference their own classes, so their
`torch_utils` and `dnnlib` packages (from a checkout of NVlabs/stylegan2-ada-pytorch or
stylegan3) must be importable. This reads PyTorch pickles of those repositories. The
TensorFlow pickles of the original StyleGAN2 need their repository's legacy.py first.
Only the unconditional 'resnet' discriminator is supported. The minibatch std group
size is not part of the state dict, so the script prints it: set disc.mbstd_group to
that value.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.discriminators import DiscriminatorError, nvidia_to_rosinality  # noqa: E402


def convert(pkl_path: Path, out_path: Path, key: str = "D") -> dict[str, torch.Tensor]:
    """Read network `key` of the pickle and write {"d": rosinality state dict} to out_path."""
    try:
        with open(pkl_path, "rb") as f:
            network = pickle.load(f)
    except ModuleNotFoundError as error:
        raise DiscriminatorError(
            f"{pkl_path}: unpickling needs the module '{error.name}'; put the "
            "stylegan2-ada-pytorch checkout (torch_utils, dnnlib) on PYTHONPATH"
        ) from None
    if not isinstance(network, dict) or key not in network:
        found = sorted(network) if isinstance(network, dict) else type(network).__name__
        raise DiscriminatorError(f"{pkl_path}: expected a dict with the entry {key!r}, found {found}")
    module = network[key]
    state_dict = nvidia_to_rosinality(module.state_dict())
    mbstd = getattr(getattr(getattr(module, "b4", None), "mbstd", None), "group_size", None)
    if mbstd is None:
        print(f"{key}.b4.mbstd.group_size not found; check the minibatch std group size yourself")
    else:
        print(f"minibatch std group size of {key}: {mbstd}; set disc.mbstd_group: {mbstd}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"d": state_dict}, out_path)
    print(f"wrote {len(state_dict)} tensors to {out_path}")
    return state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pickle", type=Path, help="NVIDIA network pickle (.pkl)")
    parser.add_argument("output", type=Path, help="output .pt file")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="required: confirm that the pickle is trusted, because reading it runs its code")
    parser.add_argument("--key", default="D", help="network entry of the pickle (default: D)")
    args = parser.parse_args(argv)
    if not args.allow_pickle:
        parser.error("reading a pickle runs code from it; pass --allow-pickle for a file you trust")
    if not args.pickle.is_file():
        parser.error(f"file not found: {args.pickle}")
    try:
        convert(args.pickle, args.output, args.key)
    except DiscriminatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
