"""A model to answer with, from one of three sources: a Lightning checkpoint (`--ckpt_path`), a llava-hf
folder or hub name (`--pretrained`), or a random-init preset (`--preset`, e.g. `tiny`, for trying the
tools offline). The terminal chat, the server and `evaluate` load through here; LoRA adapters are folded
into the weights (one matmul per layer at generation, not three).

A checkpoint is read with weights only (`training/consolidate.py` joins a sharded one first); remote code
runs only when the caller passes `trust_remote_code=True` (the command line's `--trust_remote_code`), never
because a checkpoint or folder asks. The template and image aspect are the caller's when given, else the
source's (the run's `template` / `image_aspect`, the folder's `pretrained.SETTINGS_FILE`), else defaults.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model.llava import LlavaModel

log = logging.getLogger(__name__)


def load_for_inference(
    ckpt_path: str | None = None,
    pretrained: str | None = None,
    preset: str | None = None,
    template: str | None = None,
    image_aspect: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[LlavaModel, str, str]:
    """`(model in eval mode on device, template, image aspect)` from exactly one of the three sources."""
    given = [
        name for name, v in (("ckpt_path", ckpt_path), ("pretrained", pretrained), ("preset", preset)) if v
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one model source: --ckpt_path CKPT (a training checkpoint), --pretrained DIR "
            "(a llava-hf folder or hub name) or --preset NAME (random init, e.g. tiny)"
            + (f"; got {', '.join('--' + g for g in given)}" if given else "")
        )
    if ckpt_path:
        from pathlib import Path

        from ..module import LlavaLitModule
        from ..training.consolidate import consolidated

        if not Path(ckpt_path).exists():
            raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (--ckpt_path)")
        with consolidated(ckpt_path) as ckpt_file:
            lit = LlavaLitModule.load_from_checkpoint(
                ckpt_file, map_location="cpu", weights_only=True, trust_remote_code=trust_remote_code
            )
        model = lit.model
        template, image_aspect = template or lit.template, image_aspect or lit.image_aspect
    elif pretrained:
        from ..model.llava import LlavaModel
        from ..model.pretrained import resolve_settings

        template, image_aspect = resolve_settings(pretrained, template, image_aspect)
        model = LlavaModel.from_hf(pretrained, trust_remote_code=trust_remote_code)
    else:
        from ..model.llava import LlavaModel

        model = LlavaModel.from_preset(str(preset))
    if hasattr(model.language_model, "merge_and_unload"):  # a LoRA run's adapters, folded in
        model.language_model = model.language_model.merge_and_unload()
    from ..model.pretrained import DEFAULT_ASPECT, DEFAULT_TEMPLATE

    template, image_aspect = template or DEFAULT_TEMPLATE, image_aspect or DEFAULT_ASPECT
    model = model.to(device=torch.device(device), dtype=dtype) if dtype else model.to(torch.device(device))
    log.info(
        "model from %s: template %s, image aspect %s",
        ckpt_path or pretrained or preset,
        template,
        image_aspect,
    )
    return model.eval(), template, image_aspect


def model_id_of(
    ckpt_path: str | None = None, pretrained: str | None = None, preset: str | None = None
) -> str:
    """The name answers, results and `/v1/models` give the model: `RUN-last` for `RUN/checkpoints/last.ckpt`,
    else the checkpoint's or folder's name, or the preset's."""
    from pathlib import Path

    if preset:
        return str(preset)
    path = Path(str(ckpt_path or pretrained).rstrip("/"))
    if ckpt_path:
        return f"{path.parent.parent.name}-{path.stem}" if path.parent.name == "checkpoints" else path.stem
    return path.name or "llava"


def add_model_arguments(parser, trying: str) -> None:
    """The model-source flags `chat` and `serve` share (`trying`: what `--preset` is for, in its help)."""
    parser.add_argument(
        "--ckpt_path", help="Lightning checkpoint of a training run (.ckpt file or sharded folder)"
    )
    parser.add_argument("--pretrained", help="llava-hf folder or hub name (as --model.pretrained)")
    parser.add_argument(
        "--preset", help=f"Random-init preset (tiny, tiny-next, ...): for trying {trying} out"
    )
    parser.add_argument("--template", help="Conversation template (default: the model's own, else vicuna_v1)")
    parser.add_argument(
        "--image_aspect", choices=["pad", "square"], help="Image aspect (default: the model's)"
    )
    parser.add_argument(
        "--trust_remote_code", type=bool, default=False, help="Let transformers run the model's code"
    )
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="Weights' dtype"
    )


def load_from_arguments(args) -> tuple[LlavaModel, str, str]:
    """`load_for_inference` with what `add_model_arguments` parsed."""
    return load_for_inference(
        ckpt_path=args.ckpt_path,
        pretrained=args.pretrained,
        preset=args.preset,
        template=args.template,
        image_aspect=args.image_aspect,
        trust_remote_code=args.trust_remote_code,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
