"""Shared test setup: no network, deterministic seeds, and session-scoped tiny models."""

import multiprocessing
import os
import socket

# Never let a test reach the hub: every model and tokenizer here is built from configs or local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_tokenizer(family: str):
    from llava_lightning.model.language_model import add_image_token
    from llava_lightning.model.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(family)
    add_image_token(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_llama():
    """The offline Llama-style (SentencePiece-like) tiny tokenizer with LLaVA's `<image>` token."""
    return _tiny_tokenizer("llama")


@pytest.fixture(scope="session")
def tiny_chatml():
    """The offline ChatML (byte-level BPE) tiny tokenizer with LLaVA's `<image>` token."""
    return _tiny_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama2_tokenizer_dir():
    """The real Llama-2/Vicuna tokenizer (../shared/fixtures), or a skip where a clone lacks it."""
    if not (LLAMA2_TOKENIZER / "tokenizer.model").exists():
        pytest.skip(f"fixture {LLAMA2_TOKENIZER} is absent (it lives beside the repo, not in a user's clone)")
    return LLAMA2_TOKENIZER


class Numbers(torch.utils.data.Dataset):
    """`n` items `start, start + 1, ...`: a dataset whose items show which indices a loader read."""

    def __init__(self, start: int, n: int):
        self.start, self.n = start, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.start + i


def image_batch(model, n_images: int) -> torch.Tensor:
    """Random pixel values of the right size for `model`'s vision tower."""
    size = model.vision_tower.image_size
    return torch.randn(n_images, 3, size, size)


def sample_ids(model, images: int, text: int = 12) -> torch.Tensor:
    """One sample's ids: for each image, a few text ids then the image's token span; then text."""
    vocab = 900  # below every tiny tokenizer's special ids
    parts = []
    for _ in range(images):
        parts.append(torch.randint(3, vocab, (3,)))
        parts.append(torch.full((model.vision_tower.num_tokens,), model.image_token_id))
    parts.append(torch.randint(3, vocab, (text,)))
    return torch.cat(parts)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small synthetic-shapes dataset (the demo's generator with few samples)."""
    from llava_lightning.data.synthetic import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, n_captions=80, n_instruct=48, n_eval=12, shard_size=8, n_mc_train=24, n_val=12)
    return out


@pytest.fixture(scope="session")
def tiny_stage2_ckpt(shapes_dir, tmp_path_factory):
    """A `last.ckpt` of a 3-step CLI stage-2 fit of `tiny` (template vicuna_v1, image_aspect pad)."""
    import glob

    from llava_lightning.cli import main

    root = tmp_path_factory.mktemp("stage2")
    (root / "data").mkdir()
    os.symlink(shapes_dir, root / "data" / "shapes")
    here = os.getcwd()
    os.chdir(root)  # tiny.yaml names data/shapes relative to the working directory
    try:
        main(["fit", "-c", str(REPO / "conf" / "stage2.yaml"), "-c", str(REPO / "conf" / "tiny.yaml"),
              "--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
              "--trainer.limit_val_batches=0", f"--trainer.logger.init_args.save_dir={root}/runs",
              "--trainer.logger.init_args.name=s2"])  # fmt: skip
    finally:
        os.chdir(here)
    (ckpt,) = glob.glob(f"{root}/runs/s2/version_0/checkpoints/last.ckpt")
    return Path(ckpt)


def trainer_for_strategy_yaml(name: str):
    """The Trainer the CLI builds for `stage2.yaml + tiny.yaml + strategy/NAME` (nothing runs)."""
    from llava_lightning.cli import LlavaCLI
    from llava_lightning.data import LlavaDataModule
    from llava_lightning.module import LlavaLitModule

    conf = REPO / "conf"
    files = ["stage2.yaml", "tiny.yaml", f"strategy/{name}"]
    args = [a for f in files for a in ("-c", str(conf / f))] + [
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]
    cli = LlavaCLI(LlavaLitModule, LlavaDataModule, args=args, run=False)
    return cli.trainer


def quiet_trainer(tmp_path, **kw):
    """A CPU `L.Trainer` writing nothing but under `tmp_path`: no logger, checkpoints, progress bar or
    model summary; `kw` adds settings or overrides these (e.g. `logger=`)."""
    import lightning as L

    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**settings, **kw})


def run_ranks(target, *args, world: int = 2, timeout: float = 120.0, start: str = "fork") -> None:
    """Run `target(rank, world, port, *args)` in `world` processes (forked, or `start="spawn"`; `port`: a free localhost
    port for their process group) and wait for them; a rank still running after `timeout` s is killed.
    Fails unless every rank exited with 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context(start)
    procs = [
        ctx.Process(target=_one_thread, args=(target, rank, world, port, *args)) for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung and [p.exitcode for p in procs] == [0] * world, "a rank hung or failed"


def _one_thread(target, *args) -> None:
    """A forked rank on one intra-op thread: OpenMP's pool does not survive fork, so a child of a parent
    that already ran parallel kernels hangs in its first parallel region (e.g. DDP's parameter broadcast)."""
    torch.set_num_threads(1)
    target(*args)


def write_transformers_llava(folder: Path, seed: int = 0, family: str = "llama") -> Path:
    """A tiny llava-hf folder written by transformers alone (`LlavaForConditionalGeneration` +
    `LlavaProcessor` from small configs, as a released checkpoint is), with the offline tokenizer."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from llava_lightning.model.presets import TINY_CLIP, TINY_LLAMA, TINY_QWEN2

    tok = _tiny_tokenizer(family)
    image_token = "<image>"
    text = TINY_LLAMA if family == "llama" else TINY_QWEN2
    vision = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=dict(text),
        image_token_index=tok.convert_tokens_to_ids(image_token),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    size = vision["image_size"]
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tok,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=image_token,
    ).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def hf_llava_dir(tmp_path_factory):
    """`write_transformers_llava`'s folder, once per session (tests must not write into it)."""
    return write_transformers_llava(tmp_path_factory.mktemp("hf-llava") / "tiny-llava-hf")
