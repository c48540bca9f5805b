"""Write a trained run as one .safetensors file for inference, and read it back:

    python scripts/export.py --out runs/isic isic.safetensors

The backbone with LoRA merged in (timm's own names after `backbone.`), the heads, the gate, and
what rebuilds them. load_exported(FILE) needs timm, scilt.py and this file, not the rest of the
repository (nor the hub):

    from export import load_exported
    model, meta = load_exported("isic.safetensors")   # meta: classes, img_size, mean, std, ...
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scilt  # noqa: E402


def export(model, path, /, **metadata):
    """One .safetensors file: the backbone with LoRA merged in, the heads, the gate and `metadata`
    (JSON values) naming the timm `model` and `model_kwargs` that load_exported() needs. The
    merged weights are computed beside the model's, which is left bitwise as it was given. Blocks
    are stored 1-based, as a user counts."""
    from safetensors.torch import save_file

    state = {name: tensor for name, tensor in model.state_dict().items()
             if isinstance(tensor, torch.Tensor) and ".lora_" not in name}  # not LoRA's merged flag
    for name, layer in model.named_modules():
        if isinstance(layer, scilt.LoRALinear):  # W + (alpha / r) B A, unless merged already
            state[f"{name}.base.weight"] = layer.weight
    state = {name.replace(".base.", "."): tensor.detach().cpu().clone().contiguous()
             for name, tensor in state.items()}
    metadata.update(method=model.method, fusion=model.fusion, blocks=[b + 1 for b in model.blocks])
    save_file(state, str(path), metadata={key: json.dumps(v) for key, v in metadata.items()})


def load_exported(path):
    """The model export() wrote, merged and in eval mode, and its metadata (timm's `model` name
    and `model_kwargs`, blocks 1-based). Needs timm, not its hub."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = {key: json.loads(value) for key, value in file.metadata().items()}
        state = {name: file.get_tensor(name) for name in file.keys()}
    backbone = scilt.create_backbone(metadata["model"], **metadata["model_kwargs"])
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                              if k.startswith("backbone.")})
    model = scilt.SciLT(backbone, state["log_prior"].exp(), method=metadata["method"],
                        fusion=metadata["fusion"] or "class",
                        blocks=[b - 1 for b in metadata["blocks"]])
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    model.load_state_dict(rest, strict=False)
    scilt.merge_lora(model)  # B = 0: the plain model's speed, the same outputs
    return model.eval(), metadata


def export_run(out, target, weights=None):
    """The run in `out` as the file `target`, written whole or not at all."""
    import checkpoint  # here, not above: load_exported() needs scilt.py alone
    from checkpoint import Abort, replacing
    from predict import load_run

    if "RANK" in os.environ:
        raise Abort("the export runs in one process: start it with python, not torchrun")
    target = Path(target)
    if target.is_dir() or not target.parent.is_dir():
        raise Abort(f"cannot write {target}: expected a file name in an existing folder, "
                    "such as model.safetensors")
    if target.resolve().parent == Path(out).resolve() and target.suffix != ".safetensors":
        raise Abort(f"{target} is not a .safetensors name, and it lies in the run's own "
                    "folder: expected a new file such as model.safetensors")
    model, trained, classes = load_run(out, torch.device("cpu"), weights)
    if trained.model == "tiny":
        name = checkpoint.TINY["name"]
        kwargs = {k: v for k, v in checkpoint.TINY.items() if k not in ("name", "weight_init")}
    else:
        name, kwargs = trained.model, {}
    mean, std = checkpoint.normalisation(trained.model)
    kwargs["img_size"] = trained.img_size
    with replacing(target) as temporary:
        export(model, temporary, model=name, model_kwargs=kwargs, img_size=trained.img_size,
               mean=mean, std=std, classes=classes)
    size = os.path.getsize(target) / 2**20
    print(f"wrote {target} ({size:.1f} MB): load_exported() in scripts/export.py reads it")
    return Path(target)


def main(argv=None):
    import train
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="the .safetensors file to write")
    p.add_argument("--out", required=True, help="the run's folder (train.py's --out)")
    p.add_argument("--weights", help="the backbone's weights file, if not where the run had it")
    args = p.parse_args(argv)
    return train.run_program(lambda args: export_run(args.out, args.file, args.weights), args)


if __name__ == "__main__":
    main()
