"""`LlavaLitModule`: the LightningModule that trains a `LlavaModel` through LLaVA's stages.

It holds construction, the Lightning hooks, the steps, the metrics and the optimizer. What a stage
trains is `training/stages.py`; what differs by strategy is `training/strategies.py` (called from
`configure_model` and `setup`); the loss of an optimizer step is the mean over all its supervised
tokens, across accumulation and ranks (`training/token_mean.py`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from .batch import IGNORE_INDEX, LlavaBatch, PromptBatch, supervised_mask
from .inference.generate import generate
from .model import LanguageSpec, LlavaModel, LlavaSpec, VisionSpec, get_preset
from .model.pretrained import resolve_settings
from .model.projector_io import save_projector_artifact
from .training import stages, strategies
from .training.checkpoint_file import callers_trust_remote_code, read_checkpoint, with_callers_trust
from .training.epoch_end_resume import epoch_end_as_last_batch
from .training.model_build import ModelBuilder, is_skeleton
from .training.optimizer import configure_optimizers
from .training.scaling_hooks import ScalingHooks
from .training.settings import CheckpointingConfig, LoraConfig, OptimConfig, QLoraConfig
from .training.stages import Stage
from .training.token_mean import StepTokenCount, token_mean_scale

log = logging.getLogger(__name__)

__all__ = ["CheckpointingConfig", "LlavaLitModule", "LoraConfig", "OptimConfig", "QLoraConfig", "Stage"]

# Checkpoints store these in `hyper_parameters`; allow them under torch.load(weights_only=True).
torch.serialization.add_safe_globals(
    [LlavaSpec, VisionSpec, LanguageSpec, OptimConfig, LoraConfig, QLoraConfig, CheckpointingConfig]
)


class LlavaLitModule(L.LightningModule):
    """LLaVA training: stage-specific freezing, token-normalized loss, metrics, projector hand-off."""

    def __init__(
        self,
        preset: str | None = None,
        spec: LlavaSpec | None = None,
        pretrained: str | None = None,
        stage: Stage = "align",
        unfreeze_vision_blocks: int = 0,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (a frozen-by-convention default jsonargparse can show)
        lora: LoraConfig = LoraConfig(),  # noqa: B008
        qlora: QLoraConfig = QLoraConfig(),  # noqa: B008
        gradient_checkpointing: bool = False,
        activation_checkpointing: CheckpointingConfig = CheckpointingConfig(),  # noqa: B008
        init_projector: str | None = None,
        projector_artifact: str | None = "projector",
        template: str | None = None,
        image_aspect: Literal["square", "pad"] | None = None,
        max_new_tokens: int = 64,
        sharded_init: bool = False,
        compile: bool = False,
    ):
        """
        Args:
            preset: Model preset (`tiny`, `llava-1.5-7b`, ...); when set it replaces `spec`.
            spec: The model: vision tower, projector and language model (used when preset and pretrained
                are None; with pretrained, only its language.attn_implementation and trust_remote_code apply).
            pretrained: A released llava-hf checkpoint to start from (hub name such as
                llava-hf/llava-1.5-7b-hf, or a folder transformers or our `export` wrote): tower, projector,
                LLM, tokenizer, image settings, and the template and image aspect unless set here.
            stage: What trains: align (projector), finetune (projector + LLM), full, lora, qlora (lora over
                a 4-bit LLM: docs/qlora.md).
            unfreeze_vision_blocks: Also train the last k vision-tower blocks.
            optim: Optimizer and schedule settings.
            lora: LoRA settings (stages lora and qlora).
            qlora: Quantization settings (stage qlora).
            gradient_checkpointing: Recompute activations of the trained transformer blocks in backward.
            activation_checkpointing: Per component (vision, language): none, every block or every k-th
                block; a component left unset follows `gradient_checkpointing`.
            init_projector: Projector weights to start from (our .safetensors artifact or LLaVA's mm_projector.bin).
            projector_artifact: At the end of `align`, write `<name>.safetensors` + `<name>.json` into the
                run's log directory (None: do not).
            template: Conversation template of the training data (linked into the data module by the CLI)
                and of generation / predict; None: the pretrained checkpoint's, else vicuna_v1.
            image_aspect: Image aspect handling (`square` or `pad`) of the training data (linked like
                `template`) and of generation / predict; None: the pretrained checkpoint's, else pad.
            max_new_tokens: Generation length for predict.
            sharded_init: Build the model as an empty meta-device skeleton and load the weights only once
                it is sharded (FSDP2, FSDP, DeepSpeed ZeRO-3), so no rank but 0 holds the full model;
                other strategies build it in full on every rank.
            compile: `torch.compile` each vision block and LLM decoder layer (their forward, once the
                trainer sets the model up, before a strategy shards or wraps it).
        """
        super().__init__()
        self.save_hyperparameters()
        if pretrained is not None and preset is not None:
            raise ValueError(
                f"give the model as `pretrained` or as `preset`, not both ({pretrained!r}, {preset!r})"
            )
        if preset is None and spec is None and pretrained is None:
            raise ValueError(
                "give the model as `pretrained` (e.g. llava-hf/llava-1.5-7b-hf), `preset` (e.g. tiny, "
                "llava-1.5-7b) or `spec`"
            )
        # Under load_from_checkpoint (or a CLI run from a checkpoint): the caller's trust_remote_code.
        self.spec = with_callers_trust(get_preset(preset) if preset is not None else spec or LlavaSpec())
        self.pretrained = pretrained
        template, image_aspect = resolve_settings(pretrained, template, image_aspect)
        self.stage, self.unfreeze_vision_blocks = stage, unfreeze_vision_blocks
        self.optim, self.lora_config, self.qlora_config = optim, lora, qlora
        self.gradient_checkpointing = gradient_checkpointing
        self.activation_checkpointing = activation_checkpointing
        self.init_projector, self.projector_artifact = init_projector, projector_artifact
        self.template, self.image_aspect, self.max_new_tokens = template, image_aspect, max_new_tokens
        self.sharded_init = sharded_init
        self.compile_blocks = compile
        if sharded_init and stage in ("lora", "qlora"):
            raise ValueError(
                f"sharded_init does not support stage {stage!r} (peft wraps a materialized model)"
            )
        self.builder = ModelBuilder(self.spec, init_projector, self.apply_stage, pretrained)
        # Sharded init: the weights come later (training/strategies.py), from this moment's RNG state.
        self.model = self.builder.skeleton() if sharded_init else self.builder.build()
        self.train_loss = MeanMetric()
        self.val_loss_sum, self.val_tokens, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        self.step_tokens = StepTokenCount()

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> LlavaLitModule:
        """Lightning's `load_from_checkpoint`, with two guards for files one may not trust:

        - remote code: the model spec's `trust_remote_code` is this argument, whatever the checkpoint's
          hyperparameters (or `hparams_file`, or `spec` in kwargs) say; a checkpoint that asked for it is
          named in a warning;
        - a local file is first read with weights only (memory-mapped: the weights are not read), so an
          empty, truncated or foreign file, or one holding objects outside the allowlist, raises
          `CheckpointLoadError` naming it (skipped when the caller passes `weights_only=False`).

        The stage-1 projector file a run started from (`init_projector`) is not read: the checkpoint's
        weights replace it, and on another machine it may not exist.
        """
        kwargs.setdefault("init_projector", None)
        is_local_file = isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file()
        if is_local_file and weights_only is not False:
            read_checkpoint(checkpoint_path)  # the clear error, before Lightning's own torch.load
        source = str(checkpoint_path) if isinstance(checkpoint_path, (str, Path)) else repr(checkpoint_path)
        with callers_trust_remote_code(trust_remote_code, source):
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `load_from_checkpoint` of a sharded_init run (export, notebooks): give the skeleton real
        # storage first (loading into meta tensors would silently do nothing); the checkpoint's state
        # dict fills it next, so no hub weights are read.
        if is_skeleton(self.model):
            self.model = self.builder.empty()
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and trainer.max_steps != -1:
            epoch_end_as_last_batch(checkpoint)  # Lightning #19617: training/epoch_end_resume.py

    # ----------------------------------------------------------------------------------- stages
    def apply_stage(self, model: LlavaModel | None = None) -> None:
        """Freeze `model` (default: this module's) for `self.stage` (training/stages.py)."""
        stages.apply_stage(
            self.model if model is None else model,
            self.stage,
            self.unfreeze_vision_blocks,
            self.lora_config,
            self.gradient_checkpointing,
            self.activation_checkpointing,
            self.qlora_config,
        )

    def enable_block_checkpointing(self) -> None:
        """Turn on activation checkpointing of the trained declared blocks (as `gradient_checkpointing=True`:
        every block of a component whose `activation_checkpointing` choice is unset)."""
        self.gradient_checkpointing = True
        every = self.activation_checkpointing.every(True)
        stages.enable_block_checkpointing(self.model, every["vision_tower"], every["language_model"])

    def scaling_hooks(self) -> ScalingHooks:
        """What our strategy classes read from this module (training/scaling_hooks.py)."""
        return ScalingHooks(
            block_classes=self.model.block_classes(),
            enable_block_checkpointing=self.enable_block_checkpointing,
            rank0_holds_weights=self.sharded_init,
        )

    def train(self, mode: bool = True) -> LlavaLitModule:
        """Trainable parts follow `mode`; fully frozen components stay in eval mode (dropout off)."""
        super().train(mode)
        if mode:
            for module in stages.components(self.model).values():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------- strategy
    def configure_model(self) -> None:
        strategies.configure_model(self)

    def setup(self, stage: str) -> None:
        strategies.setup_model(self, stage)

    def on_fit_start(self) -> None:
        strategies.metrics_to_device(self)

    def on_validation_start(self) -> None:
        strategies.metrics_to_device(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not strategies.clip_gradients(self.trainer.strategy, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------- steps
    def forward(self, batch: LlavaBatch, return_logits: bool = False):
        # A frozen vision tower runs under no_grad inside `LlavaModel` (through the root module's
        # forward, which FSDP2 requires). Packed rows pass no attention mask: the per-sample
        # position_ids are what keeps their samples apart (model/packed_attention.py); right-padded rows
        # pass none either (`_padding_mask`). The collator's positions keep the step free of host syncs.
        return self.model(
            batch["input_ids"],
            self._padding_mask(batch),
            batch.get("pixel_values"),
            batch["labels"],
            position_ids=batch.get("position_ids"),
            return_logits=return_logits,
            cu_seqlens=batch.get("cu_seqlens"),
            max_seqlen=batch.get("max_seqlen"),
            image_positions=batch.get("image_positions"),
            supervised_positions=batch.get("supervised_positions"),
            image_sizes=batch.get("image_sizes"),
            image_feature_index=batch.get("image_feature_index"),
        )

    def _padding_mask(self, batch: LlavaBatch) -> torch.Tensor | None:
        """The `attention_mask` the language model needs for `batch`, or None where causal attention
        alone is exact: then transformers builds no `[B, 1, T, T]` mask and runs sdpa with
        `is_causal=True` and native GQA (`enable_gqa`, no K/V repeat), flash attention with no unpadding."""
        if "position_ids" in batch:  # packed rows
            return None
        # No mask is exact only for rows 1...1 0...0 (the collator's `right_padded`, read on the host:
        # no sync) under causal attention, where every real token's keys are earlier, hence real; pad
        # positions are never scored. Left padding (generation) or a bidirectional LM keeps the mask.
        causal = getattr(self.model.language_model.config, "is_causal", True)
        if batch.get("right_padded", False) and causal:
            return None
        return batch["attention_mask"]

    def training_step(self, batch: LlavaBatch, batch_idx: int) -> torch.Tensor:
        trainer = self.trainer
        # First, on every rank (all are at the same micro-batch): the step's token count over ranks.
        step_tokens = self.step_tokens.of(batch, trainer.accumulate_grad_batches, self._sum_over_ranks)
        if batch["input_ids"].numel() == 0:
            return self._empty_batch_loss()
        out = self(batch)
        self.train_loss.update(out.loss.detach(), weight=out.num_supervised.clamp(min=1))
        return out.loss_sum * token_mean_scale(
            step_tokens, trainer.accumulate_grad_batches, trainer.world_size
        )

    def _sum_over_ranks(self, count: int) -> torch.Tensor:
        tokens = torch.tensor(count, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        return tokens

    def _empty_batch_loss(self) -> torch.Tensor:
        """A zero loss for a batch whose samples were all skipped, so every rank runs the same forward
        and backward: a dummy text sample with nothing supervised (in training `LlavaModel.embed` runs
        the tower and projector on a blank image for it, so every module runs). Summing the parameters
        would do for DDP, but FSDP, FSDP2 and ZeRO-3 gather module by module, collectively."""
        text = 1 if self.model.image_token_id == 0 else 0  # any id but the image token's
        ids = torch.tensor([[text, text]], device=self.device)
        dummy = LlavaBatch(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=torch.full_like(ids, IGNORE_INDEX),
            pixel_values=None,
            right_padded=True,
        )
        return self(dummy).loss_sum * 0.0

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.step_tokens.logged is not None:
            self.log("train/tokens", self.step_tokens.logged.float(), on_step=True, on_epoch=False)
        self.log("train/loss", self.train_loss.compute(), on_step=True, on_epoch=False, prog_bar=True)
        self.train_loss.reset()
        self.step_tokens.reset()

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def validation_step(self, batch: LlavaBatch, batch_idx: int) -> None:
        out = self(batch, return_logits=True)
        mask = supervised_mask(batch["labels"])
        predicted = out.logits[:, :-1].argmax(-1)
        self.val_loss_sum.update(out.loss_sum.detach())
        self.val_tokens.update(mask.sum())
        self.val_correct.update(((predicted == batch["labels"][:, 1:]) & mask).sum())

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_tokens.compute().clamp(min=1)
        loss = self.val_loss_sum.compute() / tokens
        split = "test" if self.trainer.testing else "val"
        self.log_dict(
            {
                f"{split}/loss": loss,
                f"{split}/ppl": torch.exp(loss),
                f"{split}/accuracy": self.val_correct.compute() / tokens,
            },
            prog_bar=True,
        )
        for metric in (self.val_loss_sum, self.val_tokens, self.val_correct):
            metric.reset()

    # `test` scores `data.test` as validation scores `data.val`, logged as test/loss, test/ppl, test/accuracy.
    test_step = validation_step
    on_test_start = on_validation_start
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Greedy replies for a batch of `{"id", "prompt", "images"}` lists (`LlavaDataModule.predict`)."""
        replies = generate(
            self.model,
            batch["images"],
            batch["prompt"],
            template=self.template,
            aspect=self.image_aspect,
            max_new_tokens=self.max_new_tokens,
        )
        return [{"id": i, "prompt": p, "reply": r} for i, p, r in zip(batch["id"], batch["prompt"], replies)]

    # ----------------------------------------------------------------------------------- optim
    def configure_optimizers(self):
        return configure_optimizers(self.model, self.optim, self.trainer, self.stage)

    # ----------------------------------------------------------------------------------- artifacts
    def on_train_end(self) -> None:
        if self.stage == "align" and self.projector_artifact:
            # Every rank gathers (a collective under sharding); rank 0 writes.
            state = self.projector_state()
            if self.trainer.is_global_zero:
                root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
                self.save_projector(root / f"{self.projector_artifact}.safetensors", state)

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's full weights on CPU (gathered from shards: every rank must call it then)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategies.gather_projector_state(strategy, self.model.multi_modal_projector)

    def save_projector(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the projector artifact (model/projector_io.py) that `init_projector` reads back.
        `state`: the weights from `projector_state()` (gathered on every rank under sharding)."""
        return save_projector_artifact(
            path,
            self.projector_state() if state is None else state,
            self.model.projector_type,
            vision=asdict(self.spec.vision),
            language=asdict(self.spec.language),
            global_step=int(self.global_step),
        )
