"""The lean training step: chunked LM-head cross-entropy, no host-device sync, per-component activation
checkpointing, compiled blocks, fused AdamW and loader settings, each checked against the plain path."""

import traceback

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, sample_ids
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from llava_lightning import LlavaModel
from llava_lightning.batch import supervised_mask
from llava_lightning.data.collate import LlavaCollator
from llava_lightning.model.linear_ce import linear_cross_entropy
from llava_lightning.model.llava import _shifted_ce


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlavaModel.from_preset("tiny").train()


def _batch(model, lengths=(12, 20, 5), images=(1, 2, 0)):
    """Right-padded samples with images and text-only rows; prompt halves unsupervised."""
    samples = [sample_ids(model, n, text) for n, text in zip(images, lengths)]
    length = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        labels[i, len(s) // 2 : len(s)] = s[len(s) // 2 :]
    labels[ids == model.image_token_id] = -100
    pixels = image_batch(model, sum(images))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, ref: dict, rel: float = 1e-5) -> None:
    """Every gradient within `rel` of its reference, relative to the reference's largest entry (fp32
    sums in another order differ by ~1e-6 of that), + 1e-8 absolute for gradients that are zero in
    exact arithmetic (attention key biases)."""
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        err = (got[name] - want).abs().max().item()
        assert err <= rel * want.abs().max().item() + 1e-8, f"{name}: max error {err:.2e}"


# ----------------------------------------------------------------------------- 1. chunked CE


def _hidden(model, batch):
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    return model.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"])[0]


def _reference_ce(model, batch):
    """Today's computation, unchunked: the head on every supervised row at once, fp32 CE."""
    model.zero_grad(set_to_none=True)
    labels = batch["labels"]
    mask = supervised_mask(labels)
    picked = _hidden(model, batch)[:, :-1][mask]
    head = model.language_model.get_output_embeddings()
    loss_sum = F.cross_entropy(head(picked).float(), labels[:, 1:][mask], reduction="sum")
    loss_sum.backward()
    return loss_sum.detach(), _grads(model)


@pytest.mark.parametrize("chunk", [1, 7, "n-1", "n", "n+5"])
def test_chunked_head_ce_equals_the_unchunked_loss_and_gradients(tiny, chunk):
    batch = _batch(tiny)
    n = int(supervised_mask(batch["labels"]).sum())
    chunk = {"n-1": n - 1, "n": n, "n+5": n + 5}.get(chunk, chunk)  # n-1: a one-row tail chunk
    ref_loss, ref_grads = _reference_ce(tiny, batch)
    tiny.zero_grad(set_to_none=True)
    head = tiny.language_model.get_output_embeddings()
    loss, loss_sum, count = _shifted_ce(_hidden(tiny, batch), batch["labels"], head, chunk=chunk)
    loss_sum.backward()
    assert int(count) == n
    torch.testing.assert_close(loss_sum.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), ref_loss / n, rtol=1e-5, atol=1e-6)
    assert_grads_close(_grads(tiny), ref_grads)


class _Wrapped(nn.Module):
    """A head that is not a plain `nn.Linear` (as a LoRA-wrapped or partitioned head is treated)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("chunk", [4, 10_000])
def test_a_head_called_as_a_module_gives_the_same_loss_and_gradients(chunk):
    torch.manual_seed(1)
    linear = nn.Linear(16, 50, bias=True)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    ref = F.cross_entropy(linear(hidden).float(), targets, reduction="sum")
    # Scaled, as the training step scales the summed loss: the backward must apply the incoming gradient.
    ref_grads = torch.autograd.grad(ref * 0.37, [hidden, linear.weight, linear.bias])
    for head in (linear, _Wrapped(linear)):  # the fused path, then the module path
        loss = linear_cross_entropy(hidden, head, targets, chunk)
        grads = torch.autograd.grad(loss * 0.37, [hidden, linear.weight, linear.bias])
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_ce_under_no_grad_and_with_a_frozen_head_computes_only_what_is_needed():
    torch.manual_seed(2)
    linear = nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, 30, (9,))
    ref = F.cross_entropy(linear(hidden), targets, reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, linear, targets, 4), ref.detach())
    loss = linear_cross_entropy(hidden, linear, targets, 4)
    (grad,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(grad, torch.autograd.grad(ref, [hidden])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_cross_entropy(hidden, linear, targets, 0)


def test_chunked_ce_under_bf16_autocast_matches_the_module_within_bf16_rounding():
    torch.manual_seed(3)
    linear = nn.Linear(64, 500, bias=False)
    hidden = torch.randn(40, 64, requires_grad=True)
    targets = torch.randint(0, 500, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(linear(hidden).float(), targets, reduction="sum")
        loss = linear_cross_entropy(hidden, linear, targets, 16)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    got = torch.autograd.grad(loss, [hidden, linear.weight])
    want = torch.autograd.grad(ref, [hidden, linear.weight])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        # bf16 keeps 8 significant bits (2^-8 = 0.4%): the matmuls round their inputs alike.
        assert (g - w).abs().max() <= 1e-2 * w.abs().max()


# ----------------------------------------------------------------------------- 2. no host-device sync

aten = torch.ops.aten
# Ops whose result the host must wait for: data-dependent shapes or a value read back.
SYNC_OPS = {
    aten.nonzero.default,
    aten._local_scalar_dense.default,  # .item(), int(t), bool(t)
    aten.is_nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    # A tensor made from host data (`torch.tensor(...)`): on an accelerator, a blocking copy to it.
    aten.lift_fresh.default,
}


class SyncFinder(TorchDispatchMode):
    """Records every op that synchronizes the host with the device (boolean-mask indexing included:
    it runs `nonzero` inside the kernel, out of this mode's sight), with where it was called."""

    def __init__(self):
        super().__init__()
        self.hits: list[tuple[str, list[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()
        )
        if func in SYNC_OPS or bool_index:
            stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]]
            self.hits.append((str(func), [f for f in stack if "/torch/" not in f]))
        return func(*args, **(kwargs or {}))


def _collated(model, image_token_id):
    samples = []
    for images, text in [(1, 12), (2, 20), (0, 5)]:
        ids = sample_ids(model, images, text)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        labels[ids == model.image_token_id] = -100
        size = model.vision_tower.image_size
        pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8)  # as the loaders ship them
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return LlavaCollator(0, image_token_id=image_token_id)(samples)


def _step(module, batch):
    """A training step's forward + loss + backward through `LlavaLitModule.forward`."""
    module.zero_grad(set_to_none=True)
    out = module(batch)
    out.loss_sum.backward()
    return out.loss_sum.detach(), _grads(module.model)


@pytest.fixture(scope="module")
def lit():
    from llava_lightning.module import LlavaLitModule

    torch.manual_seed(0)
    return LlavaLitModule(preset="tiny", stage="full").train()  # everything trains: the tower's backward too


def test_the_collator_gives_the_positions_the_model_would_find(lit):
    model = lit.model
    batch = _collated(model, model.image_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    flat_ids = ids.reshape(-1)
    assert (flat_ids[batch["image_positions"]] == model.image_token_id).all()
    assert batch["image_positions"].numel() == int((ids == model.image_token_id).sum())
    assert batch["image_positions"].tolist() == sorted(batch["image_positions"].tolist())  # image order
    positions = batch["supervised_positions"]
    torch.testing.assert_close(labels.reshape(-1)[positions + 1], labels[:, 1:][supervised_mask(labels)])
    assert (positions % ids.shape[1] < ids.shape[1] - 1).all()  # never a row's last position
    keys = {"input_ids", "attention_mask", "labels", "pixel_values", "skipped", "right_padded"}
    assert set(_collated(model, None)) == keys and batch["right_padded"] is True


MASKING = "transformers/masking_utils.py"


def _outside_masking(hits):
    return [(op, stack[-3:]) for op, stack in hits if not any(MASKING in f for f in stack)]


def test_a_training_step_with_the_collators_positions_needs_no_host_sync(lit):
    """Forward, loss and backward of `LlavaLitModule.forward` sync nowhere but in transformers' own
    attention-mask construction (with the padding mask it reads whether the mask is all ones; without
    one, on the collator's right-padded batches, whether position_ids restart)."""
    batch = _collated(lit.model, lit.model.image_token_id)
    ref_loss, ref_grads = _step(lit, {k: v for k, v in batch.items() if not k.endswith("_positions")})
    for right_padded in (False, True):  # with the padding mask, then without (section 7)
        with SyncFinder() as finder:
            loss, grads = _step(lit, {**batch, "right_padded": right_padded})
        assert finder.hits, "transformers' mask construction reads a mask value on the host"
        assert _outside_masking(finder.hits) == []
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert_grads_close(grads, ref_grads, rel=1e-6)


def test_without_the_positions_the_finder_sees_the_models_own_lookups(lit):
    """The finder is not blind: the notebook path (no collator keys) finds positions with `nonzero`."""
    batch = _collated(lit.model, None)
    with SyncFinder() as finder:
        _step(lit, batch)
    outside = _outside_masking(finder.hits)
    assert [op for op, _ in outside] == ["aten.nonzero.default"] * 2
    assert all(any("llava_lightning/batch.py" in f for f in stack) for _, stack in outside)


# ----------------------------------------------------------------------------- 3. checkpointing per component


def _block_calls(model):
    """Counts, per declared block, the calls of its first child: a checkpointed block's forward runs
    again in backward (the block's own hooks sit outside the checkpoint, so count inside it)."""
    counts = {}
    for component, cls in model.block_classes().items():
        blocks = [m for m in getattr(model, component).modules() if isinstance(m, cls)]
        counts[component] = [0] * len(blocks)
        for i, block in enumerate(blocks):
            child = next(iter(block.children()))

            def hook(*_, key=component, index=i):
                counts[key][index] += 1

            child.register_forward_hook(hook)
    return counts


def _train_step_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch, return_logits=False).loss.backward()
    return _grads(model)


@pytest.mark.parametrize(
    ("preset", "vision", "language"),
    [("tiny", 2, 3), ("tiny-timm", 2, "every"), ("tiny-timm", "every", "none")],
)
def test_every_kth_block_recomputes_in_backward_with_unchanged_gradients(preset, vision, language):
    import copy

    from llava_lightning.training import stages
    from llava_lightning.training.settings import CheckpointingConfig, every_k

    torch.manual_seed(0)
    model = LlavaModel.from_preset(preset).train()
    stages.apply_stage(model, "full")
    batch = _batch(model)
    plain = copy.deepcopy(model)
    stages.apply_stage(model, "full", checkpointing=CheckpointingConfig(vision=vision, language=language))
    counts = _block_calls(model)
    grads = _train_step_grads(model, batch)

    def expected(k, blocks, run):  # the 1st, (k+1)-th, ... block runs twice; blocks past `run` never
        return [(2 if k and i % k == 0 else 1) if i < run else 0 for i in range(blocks)]

    tower = model.vision_tower
    assert counts["vision_tower"] == expected(every_k(vision), len(tower.blocks()), tower.blocks_run)
    assert counts["language_model"] == expected(every_k(language), 4, 4)
    assert_grads_close(grads, _train_step_grads(plain, batch), rel=1e-6)
    with torch.no_grad():  # nothing to recompute without a backward
        counts = _block_calls(model)
        model(**batch)
        assert set(counts["language_model"]) == {1}


def test_gradient_checkpointing_true_still_means_every_trained_block_and_choices_override_it():
    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.settings import CheckpointingConfig

    def flags(module):
        layers = module.model.language_model.model.layers
        return [layer.gradient_checkpointing for layer in layers], [
            getattr(b, "gradient_checkpointing", False) for b in module.model.vision_tower.blocks()
        ]

    every = LlavaLitModule(preset="tiny", stage="finetune", gradient_checkpointing=True)
    assert flags(every) == ([True] * 4, [False] * 4)  # the frozen tower: nothing to recompute
    chosen = LlavaLitModule(
        preset="tiny",
        stage="full",
        gradient_checkpointing=True,
        activation_checkpointing=CheckpointingConfig(language=2, vision="none"),
    )
    assert flags(chosen) == ([True, False, True, False], [False] * 4)
    with pytest.raises(
        ValueError, match=r"activation_checkpointing.vision must be 'none', 'every' or an int"
    ):
        CheckpointingConfig(vision=0)


def test_the_checkpointing_choices_and_compile_are_cli_flags(capsys):
    import yaml
    from conftest import REPO

    from llava_lightning.cli import main

    conf = REPO / "conf"
    args = ["fit", "-c", str(conf / "stage2.yaml"), "-c", str(conf / "tiny.yaml")]
    flags = ["--model.activation_checkpointing.language=2", "--model.activation_checkpointing.vision=every"]
    with pytest.raises(SystemExit):
        main([*args, *flags, "--model.compile=true", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["activation_checkpointing"] == {"vision": "every", "language": 2}
    assert model["compile"] is True


# ----------------------------------------------------------------------------- 4. compiled blocks


def test_every_declared_block_compiles_as_one_graph_and_the_step_is_unchanged():
    """fullgraph=True raises on any graph break; `aot_eager` traces forward and backward as inductor
    would, without its CPU code generation (too slow for the suite: see the inductor test below)."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from llava_lightning.training import stages
    from llava_lightning.training.compile import compile_blocks, declared_blocks, is_compiled
    from llava_lightning.training.settings import CheckpointingConfig

    torch.manual_seed(0)
    model = LlavaModel.from_preset("tiny").train()
    stages.apply_stage(model, "full", checkpointing=CheckpointingConfig(vision=2, language=2))
    batch = _batch(model)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, fullgraph=True, backend="aot_eager") == len(declared_blocks(model))
    assert all(is_compiled(b) for b in declared_blocks(model))
    assert compile_blocks(model, fullgraph=True, backend="aot_eager") == 0  # once only
    grads = _train_step_grads(model, batch)
    assert dict(counters["graph_break"]) == {}
    # One graph per block class and checkpointing setting (CLIP and Llama, checkpointed or not).
    assert counters["stats"]["unique_graphs"] == 4
    ref = _train_step_grads(eager, batch)
    torch.testing.assert_close(
        model(**batch, return_logits=False).loss,
        eager(**batch, return_logits=False).loss,
        rtol=1e-5,
        atol=1e-5,
    )
    assert_grads_close(grads, ref, rel=1e-5)
    copied = copy.deepcopy(model)  # a copy's compiled blocks run its own weights
    layer = copied.language_model.model.layers[0]
    assert layer.forward.__self__ is layer


def test_an_inductor_compiled_decoder_layer_gives_the_eager_loss_and_gradients():
    """Inductor's CPU code for one block (compiling all of them takes minutes on a small CPU)."""
    import copy

    import torch._dynamo

    from llava_lightning.training.compile import compile_modules

    torch.manual_seed(0)
    model = LlavaModel.from_preset("tiny").train()
    batch = _batch(model)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    assert compile_modules([model.language_model.model.layers[1]], fullgraph=True) == 1
    grads = _train_step_grads(model, batch)
    loss = model(**batch, return_logits=False).loss
    torch.testing.assert_close(loss, eager(**batch, return_logits=False).loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, _train_step_grads(eager, batch), rel=1e-5)


@pytest.mark.parametrize("compile_", [True, False])
def test_configure_model_compiles_the_blocks_before_fsdp2_shards_them(monkeypatch, compile_):
    from types import SimpleNamespace

    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.compile import declared_blocks, is_compiled
    from llava_lightning.training.fsdp2 import FSDP2Strategy

    strategy = FSDP2Strategy()
    seen = []
    monkeypatch.setattr(
        strategy, "shard", lambda model: seen.append([is_compiled(b) for b in declared_blocks(model)])
    )
    module = LlavaLitModule(preset="tiny", stage="finetune", compile=compile_)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_model()
    module.configure_model()  # Lightning calls it again for each trainer function: nothing twice
    assert seen == [[compile_] * len(declared_blocks(module.model))]


# ----------------------------------------------------------------------------- 5. fused AdamW, loaders


def test_adamw_runs_fused_on_cuda_and_foreach_elsewhere():
    from types import SimpleNamespace

    import lightning as L

    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.optimizer import adamw_kernel

    def on(kind):
        return [{"params": [SimpleNamespace(device=torch.device(kind))] * 2}]

    assert adamw_kernel(on("cuda")) == {"fused": True}
    assert adamw_kernel(on("cpu")) == {"foreach": True}
    assert adamw_kernel(on("cuda") + on("cpu")) == {"foreach": True}  # one step, one device kind
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    lit.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = lit.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


def _instruct(shapes_dir):
    from llava_lightning.data import SourceConfig

    root = shapes_dir / "instruct"
    return SourceConfig(kind="instruct", path=str(root / "llava_instruct.json"), image_root=str(root))


def test_loaders_keep_workers_only_where_the_epoch_lives_in_this_process(shapes_dir):
    from llava_lightning.data import LlavaDataModule, SourceConfig

    model = LlavaModel.from_preset("tiny")
    shards = SourceConfig(kind="captions", path=str(shapes_dir / "captions" / "shard-{00000..00001}.tar"))
    for workers in (0, 2):
        dm = LlavaDataModule(train=[_instruct(shapes_dir)], val=[shards], batch_size=4, num_workers=workers)
        dm.connect(model)
        train, val = dm.train_dataloader().loader, dm.val_dataloader()
        assert train.persistent_workers is (workers > 0)  # map-style: the sampler holds epoch and offset
        assert val.persistent_workers is False  # streamed: each worker's copy holds the epoch
        assert train.pin_memory is val.pin_memory is torch.cuda.is_available()  # no trainer: CUDA or not


class _EpochStream(torch.utils.data.IterableDataset):
    """Yields its epoch: what a streamed source's worker copies see."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None or info.id == 0:
            yield self.epoch


def test_persistent_workers_would_miss_a_streamed_sources_set_epoch():
    """Why streamed sources keep no workers: set_epoch reaches the copies of a new pass only."""
    stream = _EpochStream()
    loader = torch.utils.data.DataLoader(stream, num_workers=2, persistent_workers=True, batch_size=None)
    assert list(loader) == [0]
    stream.set_epoch(1)
    assert list(loader) == [0]  # the workers' copies kept epoch 0
    fresh = torch.utils.data.DataLoader(stream, num_workers=2, batch_size=None)
    assert list(fresh) == [1]


def test_mid_epoch_resume_with_persistent_workers_gives_the_uninterrupted_run(shapes_dir, tmp_path):
    """The instruct source with 2 (now persistent) workers: 3 epochs, resumed in epoch 1's middle."""
    from test_resume import test_resume_from_the_first_middle_and_last_batch_of_an_epoch as resume_test

    resume_test(shapes_dir, tmp_path, False, 16, 2, 1.0, 1, [5])


# ----------------------------------------------------------------------------- 6. the bench's compositions


def test_the_model_bench_supervises_half_or_all_of_the_text_or_every_position(tiny):
    from llava_lightning.bench.model_step import make_batch, step_positions

    image = tiny.vision_tower.num_tokens
    half, full, every = (make_batch(tiny, 2, 64, supervised=s) for s in ("half", "all", "every"))
    for batch in (half, full):
        assert (batch["labels"][batch["input_ids"] == tiny.image_token_id] == -100).all()
    assert torch.equal(every["labels"], every["input_ids"])
    text = 64 - 1 - image  # after BOS and the image span
    assert (full["labels"] != -100).sum(1).tolist() == [text] * 2
    assert (half["labels"] != -100).sum(1).tolist() == [text - text // 2] * 2
    collated = LlavaCollator(0, image_token_id=tiny.image_token_id)(
        [
            {"input_ids": i, "labels": lab, "pixel_values": p[None]}
            for i, lab, p in zip(*(full[k] for k in ("input_ids", "labels", "pixel_values")))
        ]
    )
    for key, value in step_positions(tiny, full).items():
        assert torch.equal(value, collated[key]), key
    with pytest.raises(ValueError, match="supervised must be one of"):
        make_batch(tiny, 1, 64, supervised="most")


# ----------------------------------------------------------------------------- 7. right padding: no mask


def _real_logits(module, batch):
    with torch.no_grad():
        logits = module(batch, return_logits=True).logits
    return logits[batch["attention_mask"].bool()]


def _full_rows(model):
    """Rows of one length (nothing padded) with images and a text-only row, as the collator builds them."""
    samples = []
    for images, text in [(1, 12), (0, 3 + model.vision_tower.num_tokens + 12)]:
        ids = sample_ids(model, images, text)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        labels[ids == model.image_token_id] = -100
        size = model.vision_tower.image_size
        pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return LlavaCollator(0, image_token_id=model.image_token_id)(samples)


@pytest.mark.parametrize("rows", ["padded", "full"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_right_padded_batches_without_the_mask_give_the_masked_loss_gradients_and_logits(lit, rows, attn):
    """Right padding under causal attention: the mask-free forward (the collator's `right_padded`)
    equals the masked one at every real position, in the loss, its count, every gradient and logits."""
    lm = lit.model.language_model
    batch = _collated(lit.model, lit.model.image_token_id) if rows == "padded" else _full_rows(lit.model)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == (3 if rows == "padded" else 1) and batch["right_padded"] is True
    masked = {**batch, "right_padded": False}
    assert lit._padding_mask(batch) is None and lit._padding_mask(masked) is batch["attention_mask"]
    lm.set_attn_implementation(attn)
    try:
        lit.zero_grad(set_to_none=True)
        ref = lit(masked)
        ref.loss_sum.backward()
        ref_grads = _grads(lit.model)
        lit.zero_grad(set_to_none=True)
        out = lit(batch)
        out.loss_sum.backward()
        grads = _grads(lit.model)
        assert int(out.num_supervised) == int(ref.num_supervised) > 0
        torch.testing.assert_close(out.loss_sum.detach(), ref.loss_sum.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=0)
        assert_grads_close(grads, ref_grads, rel=1e-5)
        torch.testing.assert_close(_real_logits(lit, batch), _real_logits(lit, masked), rtol=1e-5, atol=1e-5)
    finally:
        lm.set_attn_implementation("sdpa")


class _SdpaCalls:
    """Records the attention calls of the language model (not the vision tower's) through
    `torch.nn.functional.scaled_dot_product_attention`, which transformers' sdpa attention calls."""

    def __init__(self, monkeypatch, lm):
        self.calls: list[dict] = []
        self.inside = False
        sdpa = F.scaled_dot_product_attention

        def recorded(query, key, value, attn_mask=None, is_causal=False, **kwargs):
            if self.inside:
                self.calls.append(
                    {
                        "mask": None if attn_mask is None else tuple(attn_mask.shape),
                        "is_causal": is_causal,
                        "gqa": bool(kwargs.get("enable_gqa", False)),
                        "kv_heads": key.shape[1],
                    }
                )
            return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
        decoder = lm.get_decoder()
        self.hooks = [
            decoder.register_forward_pre_hook(lambda *_: setattr(self, "inside", True)),
            decoder.register_forward_hook(lambda *_: setattr(self, "inside", False)),
        ]

    def take(self) -> list[dict]:
        calls, self.calls = self.calls, []
        return calls


def test_the_training_and_validation_forward_of_a_right_padded_batch_materializes_no_mask(lit, monkeypatch):
    """sdpa runs with `is_causal=True`, no `attn_mask` and native GQA (`enable_gqa`, the 2 KV heads
    not repeated to 4); the same batch with its mask (a batch not marked `right_padded`) gets a
    `[B, 1, T, T]` mask and repeated K/V, which is what this test would see if the module passed it."""
    model = lit.model
    config = model.language_model.config
    batch = _collated(model, model.image_token_id)
    b, t = batch["input_ids"].shape
    recorder = _SdpaCalls(monkeypatch, model.language_model)
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    assert kv_heads < config.num_attention_heads
    free = {"mask": None, "is_causal": True, "gqa": True, "kv_heads": kv_heads}
    masked = {"mask": (b, 1, t, t), "is_causal": False, "gqa": False, "kv_heads": config.num_attention_heads}
    try:
        lit(batch).loss_sum.backward()  # the training forward (the LM head on supervised rows only)
        assert recorder.take() == [free] * layers
        lit.validation_step(batch, 0)  # the logits forward
        assert recorder.take() == [free] * layers
        lit({**batch, "right_padded": False})
        assert recorder.take() == [masked] * layers
    finally:
        lit.zero_grad(set_to_none=True)
        for metric in (lit.val_loss_sum, lit.val_tokens, lit.val_correct):
            metric.reset()
        for hook in recorder.hooks:
            hook.remove()


_UNSET = object()


def test_the_mask_stays_where_no_mask_would_change_real_positions(lit):
    """Batches not marked right-padded (a notebook's, left-padded prompts) keep their mask, and so does a
    bidirectional LM (`config.is_causal=False`, where pads would be attended to); packed rows pass none."""
    batch = _collated(lit.model, lit.model.image_token_id)
    unmarked = {k: v for k, v in batch.items() if k != "right_padded"}
    assert lit._padding_mask(unmarked) is batch["attention_mask"]
    config = lit.model.language_model.config
    saved = config.__dict__.get("is_causal", _UNSET)
    config.is_causal = False
    try:
        assert lit._padding_mask(batch) is batch["attention_mask"]
    finally:
        if saved is _UNSET:
            del config.is_causal
        else:
            config.is_causal = saved
    ids = torch.arange(3, 9)
    text = {"input_ids": ids, "labels": ids, "pixel_values": torch.zeros(0, 3, 8, 8)}
    packed = LlavaCollator(0, pack_tokens=64)([text])
    assert "right_padded" not in packed and lit._padding_mask(packed) is None
